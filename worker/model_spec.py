"""The model spec: one line of text that names a model (`--model`), and build_model, which
makes that model for a data set. Every place that needs the run's model builds it here.

Grammar (widths are whole numbers >= 1; input and output sizes come from the data):

    mlp:W1,W2,...     Dense(W1) ReLU Dense(W2) ReLU ... Dense(classes). `mlp:` alone is
                      softmax regression (one Dense). `--hidden 256,128` means `mlp:256,128`.
    cnn:C1,C2,...     for each Ci: Conv2d(Ci, 3x3, stride 1, padding 1) ReLU MaxPool2d(2);
                      then Flatten and Dense(classes). Needs images (digits: 8x8, MNIST:
                      28x28); each pool halves the map (floor), and a map smaller than 2x2
                      cannot be pooled again: a spec with too many layers is refused.
    cnn:C1,.../H1,... as cnn:C1,..., with hidden Dense(Hj) ReLU layers before the classifier.

Parameters are named per layer kind, in order: cnn:8,16/32 has conv0, conv1, dense0 (the
hidden layer) and dense1 (the classifier), each with .weight and .bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.layers import Conv2d, Dense, Flatten, Layer, MaxPool2d, ReLU
from worker.model import MLP
from worker.sequential import Sequential

__all__ = ["KINDS", "ModelSpec", "build_model", "param_names", "parse_spec", "spec_of"]

KINDS = ("mlp", "cnn")


class _HasModel(Protocol):  # a TrainConfig (not imported: worker.settings imports this file)
    model: str | None
    hidden: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # mlp | cnn
    widths: tuple[int, ...]  # mlp: hidden widths; cnn: channels of each conv block
    hidden: tuple[int, ...] = ()  # cnn: widths of the hidden Dense layers after the convs
    text: str = ""  # the spec as given


def _widths(spec: str, text: str, what: str, allow_empty: bool) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    if not parts and not allow_empty:
        raise ValueError(f"model spec {spec!r}: expected at least one {what}")
    values = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"model spec {spec!r}: {what} {part!r} is not a whole number"
                             ) from None
        if value < 1:
            raise ValueError(f"model spec {spec!r}: {what} must be >= 1, got {value}")
        values.append(value)
    return tuple(values)


def parse_spec(spec: str) -> ModelSpec:
    """"cnn:8,16/64" -> ModelSpec("cnn", (8, 16), (64,)); checks the grammar only (what fits
    the data is build_model's to check)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"model spec {spec!r}: expected KIND:WIDTHS with KIND one of "
                         f"{', '.join(KINDS)} (e.g. mlp:128 or cnn:8,16)")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"model spec {spec!r}: unknown kind {kind!r}; expected one of "
                         f"{', '.join(KINDS)}")
    if kind == "mlp":
        if "/" in rest:
            raise ValueError(f"model spec {spec!r}: '/' (hidden layers after convolutions) "
                             f"is for cnn; mlp lists its hidden widths alone")
        return ModelSpec("mlp", _widths(spec, rest, "hidden width", True), text=spec)
    convs, _, hidden = rest.partition("/")
    return ModelSpec("cnn", _widths(spec, convs, "channel count", False),
                     _widths(spec, hidden, "hidden width", False) if "/" in rest else (),
                     text=spec)


def spec_of(source: str | _HasModel) -> str:
    """The spec text of a spec, or of a TrainConfig (its --model, else mlp: of its --hidden)."""
    if isinstance(source, str):
        return source
    if source.model is not None:
        return source.model
    return "mlp:" + ",".join(str(h) for h in source.hidden)


def param_names(spec: str) -> list[str]:
    """The parameter names a spec gives, whatever the data (for checks before data loads)."""
    parsed = parse_spec(spec)
    if parsed.kind == "mlp":
        dense = len(parsed.widths) + 1
        convs = 0
    else:
        dense = len(parsed.hidden) + 1
        convs = len(parsed.widths)
    layers = [f"conv{i}" for i in range(convs)] + [f"dense{j}" for j in range(dense)]
    return [f"{layer}.{part}" for layer in layers for part in ("weight", "bias")]


def _cnn(parsed: ModelSpec, image_shape: tuple[int, int] | None, n_features: int,
         n_classes: int, seed: int) -> Sequential:
    spec = parsed.text
    if image_shape is None:
        raise ValueError(f"model spec {spec!r}: a CNN needs images, but the data set has no "
                         f"image shape (its {n_features} features are not a picture)")
    height, width = (int(n) for n in image_shape)
    if height * width != n_features:
        raise ValueError(f"model spec {spec!r}: image shape {height}x{width} does not match "
                         f"the data's {n_features} features")
    layers: list[Layer] = []
    channels = 1
    for i, out in enumerate(parsed.widths):
        if height < 2 or width < 2:
            raise ValueError(
                f"model spec {spec!r}: after {i} conv block(s) the map is {height}x{width}, "
                f"too small to pool again; a {image_shape[0]}x{image_shape[1]} image takes "
                f"at most {i} blocks")
        layers += [Conv2d(channels, out, 3, stride=1, padding=1), ReLU(), MaxPool2d(2)]
        channels, height, width = out, height // 2, width // 2
    layers.append(Flatten())
    features = channels * height * width
    for hidden in parsed.hidden:
        layers += [Dense(features, hidden), ReLU()]
        features = hidden
    layers.append(Dense(features, n_classes))
    return Sequential(layers, (1, *image_shape), seed=seed, spec=spec)


def build_model(source: str | _HasModel, n_features: int,
                image_shape: tuple[int, int] | None, n_classes: int,
                seed: int = 0) -> Sequential:
    """The model that `source` (a spec, or a TrainConfig: --model, else --hidden) names, for
    data of n_features features per example (image_shape (H, W) if they are a picture) and
    n_classes classes; its init_params are drawn from `seed`. Raises ValueError naming the
    spec and what does not fit."""
    spec = spec_of(source)
    parsed = parse_spec(spec)
    if n_features < 1 or n_classes < 1:
        raise ValueError(f"model spec {spec!r}: the data must have features and classes, got "
                         f"{n_features} features and {n_classes} classes")
    if parsed.kind == "mlp":
        model = MLP((n_features, *parsed.widths, n_classes), seed=seed)
        model.spec = spec
        return model
    return _cnn(parsed, image_shape, n_features, n_classes, seed)
