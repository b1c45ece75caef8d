"""Property-based: any valid Conv/ConvTranspose configuration folds and stays equivalent in onnxruntime."""

from hypothesis import HealthCheck, given, settings
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_random_configuration_folds_and_verifies(cfg):
    model = conv_bn_model(**cfg)
    folded, report = fold_model(model)
    assert len(report.folded) == 1, report.summary()
    result = verify(model, folded, seed=cfg["seed"] % 1000)
    assert result, f"{cfg}\n{result}"
