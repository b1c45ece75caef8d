"""Property-based: any valid Conv/ConvTranspose configuration folds and stays equivalent in onnxruntime."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builders import conv_bn_model
from onnxfold import fold_model, verify


@st.composite
def conv_configs(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    transpose = draw(st.booleans())
    kernel = draw(st.integers(1, 3))
    strides = draw(st.integers(1, 3))
    dilations = draw(st.integers(1, 2))
    pads = draw(st.integers(0, kernel - 1))
    cfg = dict(
        dims=dims,
        groups=groups,
        transpose=transpose,
        cin=groups * draw(st.integers(1, 3)),
        cout=groups * draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        spatial=draw(st.integers(dilations * (kernel - 1) + 1, 7)),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    )
    if transpose and strides > 1:
        cfg["output_padding"] = draw(st.integers(0, strides - 1))
    return cfg


# Found by this test: a float16 1x1 Conv whose output (1.2e-3) cancels terms near 0.25. Verified as the
# command line verifies (with the folds), its tolerance takes the folded bias's scale; verify() given
# the graph outputs alone cannot know it and fails this model.
CANCELLING = {"dims": 1, "groups": 1, "transpose": False, "cin": 1, "cout": 1, "bias": True, "kernel": 1,
              "strides": 1, "dilations": 1, "pads": 0, "spatial": 1, "dtype": "float16", "seed": 72569,
              "epsilon": 1e-05}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
@example(CANCELLING)
def test_random_configuration_folds_and_verifies(cfg):
    model = conv_bn_model(**cfg)
    folded, report = fold_model(model)
    assert len(report.folded) == 1, report.summary()
    result = verify(model, folded, seed=cfg["seed"] % 1000, folds=report.folded)
    assert result, f"{cfg}\n{result}"
