"""An affine before a producer folds into the producer's INPUT channels."""

from __future__ import annotations

from ..affine import NotFoldable, fold_input_affine
from .base import GraphQuery, Match, NewValue, Rewrite, Rule, Update, attr, is_default
from .consumers import BatchNormConsumer
from .producers import bias_hint, conv_constants


class BatchNormBeforeConv(Rule):
    """BatchNormalization -> Conv: the affine folds into the Conv's INPUT channels.

    W'[m, j] = W[m, j] * scale[c]; b'[m] = b[m] + sum over j and the kernel of W[m, j, k] * shift[c],
    with c = g*C/group + j for output channel m of group g. Only when the Conv has no padding (pads all
    zero or auto_pad VALID): zero padding is applied after BatchNormalization, so with padding the
    border outputs would see shift where the original saw zeros.
    """

    name = "bn_conv"
    anchors = ("Conv",)
    description = "BatchNormalization -> Conv without padding (into the Conv's input channels)"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        conv = g.node(i)
        if not conv.input or not conv.input[0]:
            return ""
        bi, chain = g.upstream(conv.input[0])
        if bi is None:
            return ""
        bn = g.node(bi)
        if bn.op_type != "BatchNormalization" or not is_default(bn):
            return ""
        return Match(
            upstream=bi, downstream=i,
            between=[bn.output[0], *(g.node(k).output[0] for k in reversed(chain))],
            remove=[bi, *chain],
            inputs={(i, 0): bn.input[0]},  # the Conv reads the BatchNormalization's input
            output=conv.output[0],
            reads={*bn.input[1:], *conv.input[1:]} - {""},
        )

    def fold(self, g: GraphQuery, m: Match) -> Rewrite:
        bn, conv = g.node(m.upstream), g.node(m.downstream)
        _check_unpadded(conv)
        w, b = conv_constants(g, conv)
        group = int(attr(conv, "group", 1))
        scale, shift = BatchNormConsumer().affine(g, bn, 0, w.shape[1] * group, w.ndim)
        w2, b2 = fold_input_affine(w, b, scale, shift, group)
        return Rewrite(w.dtype, {m.downstream: Update({1: NewValue(w2, "weight", conv.input[1]),
                                                       2: NewValue(b2, "bias", bias_hint(conv))})})


def _check_unpadded(conv) -> None:
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        raise NotFoldable(f"Conv pads its input (auto_pad={auto_pad}): zero padding after BatchNormalization "
                          "is not an affine of the input")
    pads = attr(conv, "pads", None)
    if auto_pad == "NOTSET" and pads and any(pads):
        raise NotFoldable(f"Conv pads its input (pads={list(pads)}): zero padding after BatchNormalization "
                          "is not an affine of the input")
