"""Classifiers: any timm model, plus the paper's CIFAR networks registered in timm's registry.

Importing this module registers cifar_resnet20/32/56/110 (He et al. 2016, section 4.2,
shortcut option A; and cifar_resnet8, the family's smallest, for quick checks and the
tests' runs) and cifar_densenet_bc100/bc190 (Huang et al. 2017), so both
`create_model("cifar_resnet56", 100)` and `timm.create_model("cifar_resnet56",
num_classes=100)` work. They follow timm's classifier interface (`forward_features`,
`forward_head`, `num_features`, `num_classes`, `get_classifier`, `reset_classifier`), so
the rest of fasttt treats every model alike. They are built by timm's `build_model_with_cfg`,
so each carries a `pretrained_cfg`: fasttt's default evaluation view (32 px, bilinear, no
crop), or, when its weights come from an export, that run's (see _build). The import also
registers `fasttt_softmax_average`, the model of an ensemble export (`SoftmaxAverage`).
Parameters with 10 / 100 classes:
ResNet-8 75,290 / 81,140; ResNet-20 269,722 / 275,572; ResNet-32 464,154 / 470,004;
ResNet-56 853,018 / 858,868; ResNet-110 1,727,962 / 1,733,812; DenseNet-BC-100 769,162 / 800,032;
DenseNet-BC-190 25,624,430 / 25,821,620.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from torch import nn

from fasttt.checkpoint import load_weights
from fasttt.errors import UserError
from fasttt.recipe import AugmentConfig, ModelConfig, RunConfig

CIFAR_MODELS = (
    "cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110",
    "cifar_densenet_bc100", "cifar_densenet_bc190",
)
ENSEMBLE = "fasttt_softmax_average"  # the architecture of an ensemble export's config.json
# Names timm resolves from the Hugging Face Hub or a folder rather than its registry.
_TIMM_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_model_name(name: str) -> None:
    """Refuse, in one line naming the closest known names, a model timm cannot build."""
    if name.startswith(_TIMM_SOURCE_PREFIXES) or timm.is_model(name):
        return
    # timm's registry holds our CIFAR networks too: importing this module registered them
    closest = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = (f" (closest: {', '.join(closest)}; e.g. --set model.name={closest[0]})"
            if closest else "")
    raise UserError(f"unknown model {name!r}{hint}: set model.name to a timm name "
                    f"(timm.list_models()) or one of {', '.join(CIFAR_MODELS)}")


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A timm model (our CIFAR networks included) with a `num_classes`-way linear head."""
    check_model_name(name)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def build_model(model: ModelConfig, run: RunConfig, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model of the recipe's architecture, seeded, in the run's layout."""
    torch.manual_seed(seed)
    network = create_model(model.name, num_classes)
    if run.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if run.compile is True and not run.whole_step:  # "auto" is decided by decide_compile
        # in place: state_dict keys (and so checkpoints) stay unchanged
        network.compile(mode=run.compile_mode)
    return network


def decide_compile(run: RunConfig, augment_kind: str, device: torch.device) -> RunConfig:
    """`run` with compile = "auto" decided: on with CUDA graphs where measured to win, else off."""
    if run.compile != "auto":
        return run
    if device.type == "cuda" and augment_kind == "pad_crop":
        return dataclasses.replace(run, compile=True, compile_mode="reduce-overhead")
    return dataclasses.replace(run, compile=False)


def compiled_so_far() -> tuple[int, float]:
    """Graphs torch.compile has compiled in this process, and the seconds that took."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    seconds = sum(metrics.get("_compile.compile_inner", ()))
    seconds += sum(metrics.get("backward._backward_impl", ()))  # compiled at the first backward
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], seconds


def last_epoch_model(weights: Path, model: ModelConfig, run: RunConfig, num_classes: int,
                     device: torch.device) -> nn.Module:
    """A generation's LAST-epoch weights (never its best epoch), on `device`."""
    network = build_model(model, run, num_classes, seed=0)
    load_weights(network, weights)
    return network.to(device)


def penultimate_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features that feed the classifier, shape (B, model.num_features)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


# ---------------------------------------------------------------- shared pieces


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by a BatchNorm, whose shift makes it redundant.
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)


def _linear_head(num_features: int, num_classes: int) -> nn.Module:
    # timm's convention: num_classes=0 means no classifier, forward returns pooled features.
    if num_classes == 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    nn.init.zeros_(head.bias)
    return head


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class _PooledLinearClassifier(nn.Module):
    """Global average pooling and a linear head over `forward_features`, timm-style."""

    def _add_head(self, num_features: int, num_classes: int) -> None:
        # Called last in a subclass's __init__ so the head comes last in the state dict.
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.fc = _linear_head(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map of the last block, (B, num_features, H, W)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map; return the pooled features if `pre_logits`, else logits."""
        # A mean over H and W is layout-agnostic, so channels_last needs nothing special.
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (nn.Identity when num_classes is 0)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh `num_classes`-way one on the same device and dtype."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only average pooling is supported, got global_pool={global_pool!r}")
        weight = next(self.parameters())
        self.num_classes = num_classes
        self.fc = _linear_head(self.num_features, num_classes).to(weight.device, weight.dtype)


def _cifar_cfg(first_conv: str) -> dict:
    """timm's default pretrained_cfg of a CIFAR network: fasttt's default evaluation view."""
    view = AugmentConfig()
    return {"input_size": (3, view.eval_size, view.eval_size), "interpolation": "bilinear",
            "crop_pct": view.eval_crop_ratio, "crop_mode": "center", "mean": view.mean,
            "std": view.std, "num_classes": 10, "first_conv": first_conv, "classifier": "fc"}


# Read by timm's register_model: the cfg each name gets when nothing else is given.
default_cfgs = {name: _cifar_cfg("stem" if "densenet" in name else "stem.0")
                for name in CIFAR_MODELS}


def _export_config(where) -> dict | None:
    """The config.json of the fasttt export `where` is (a directory) or lies in; else None."""
    if not isinstance(where, (str, Path)):
        return None
    path = Path(where)
    try:
        config = json.loads(((path if path.is_dir() else path.parent) / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("fasttt"), dict) else None


def _build(model_cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """A registered network through timm's build_model_with_cfg, so it has a pretrained_cfg.

    Weights in a fasttt export (`local-dir:EXPORT`, or pretrained_cfg_overlay's file) bring
    the export's pretrained_cfg, the run's evaluation view, unless one is given; an export
    of an ensemble or of another architecture is refused in one line.
    """
    if pretrained:
        given = kwargs.get("pretrained_cfg")
        cfg = given.to_dict() if hasattr(given, "to_dict") else given
        cfg = {**(cfg if isinstance(cfg, dict) else {}),
               **(kwargs.get("pretrained_cfg_overlay") or {})}
        if not (cfg.get("file") or cfg.get("state_dict")):
            raise UserError(f"{variant} has no published weights: load an export with "
                            "timm.create_model('local-dir:EXPORT', pretrained=True) (python -m "
                            "fasttt.export writes one), or set pretrained=False")
        export = _export_config(cfg.get("file"))
        if export:
            _check_export(export, variant, cfg["file"])
            if not given:  # the README's pretrained_cfg_overlay=dict(file=...) alone
                kwargs["pretrained_cfg"] = {**export["pretrained_cfg"],
                                            "label_names": export.get("label_names")}
        elif "num_classes" in kwargs and not given:  # a run's last.safetensors: its head is
            kwargs["pretrained_cfg_overlay"] = {  # loaded, never dropped for another width
                "num_classes": kwargs["num_classes"], **kwargs["pretrained_cfg_overlay"]}
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


def _check_export(export: dict, variant: str, where) -> None:
    """Refuse, in one line, an export whose weights are not one `variant` network."""
    directory = Path(where) if Path(where).is_dir() else Path(where).parent
    if export["fasttt"].get("outputs") == "probabilities":
        by_timm = (f"timm.create_model('local-dir:{directory}', pretrained=True) or "
                   if export.get("architecture") == ENSEMBLE else "")  # older ones: fasttt's
        raise UserError(f"{directory} is an ensemble export (the softmax average of generations "
                        f"{export['fasttt'].get('generations')}), not one {variant}: load it "
                        f"with {by_timm}fasttt.export.load_export('{directory}')")
    if export.get("architecture") != variant:
        raise UserError(f"{directory} is an export of {export.get('architecture')}, not "
                        f"{variant}: load it with timm.create_model('local-dir:{directory}', "
                        "pretrained=True)")


# ---------------------------------------------------------------- ResNet (He et al. 2016)


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a parameter-free shortcut (option A), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, downsampled by `stride`."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A keeps the parameter counts of the paper: subsample, then zero channels.
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class CifarResNet(_PooledLinearClassifier):
    """ResNet for 32x32 images: depth 6n+2, stages of 16/32/64 channels (He et al. 2016, 4.2)."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(_conv(in_chans, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(
            _stage(16, 16, blocks, stride=1),
            _stage(16, 32, blocks, stride=2),
            _stage(32, 64, blocks, stride=2),
        )
        self._add_head(64, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, (B, 64, H/4, W/4)."""
        return self.stages(self.stem(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    first = _BasicBlock(in_channels, out_channels, stride)
    rest = [_BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 for CIFAR, 0.08M parameters: one block per stage, about 3x ResNet-20's speed."""
    return _build(CifarResNet, "cifar_resnet8", pretrained, depth=8, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR, 0.27M parameters."""
    return _build(CifarResNet, "cifar_resnet20", pretrained, depth=20, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR, 0.46M parameters."""
    return _build(CifarResNet, "cifar_resnet32", pretrained, depth=32, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR, 0.85M parameters."""
    return _build(CifarResNet, "cifar_resnet56", pretrained, depth=56, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR, 1.7M parameters."""
    return _build(CifarResNet, "cifar_resnet110", pretrained, depth=110, **kwargs)


# ---------------------------------------------------------------- DenseNet-BC (Huang et al. 2017)


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k) then BN-ReLU-3x3 conv (k): k new channels from all earlier ones."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv(in_channels, 4 * growth, 1)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = _conv(4 * growth, growth, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The k new channels computed from the block's input and earlier layers' outputs."""
        x = self.conv1(F.relu(self.norm1(torch.cat(features, dim=1))))
        return self.conv2(F.relu(self.norm2(x)))


class _DenseBlock(nn.Module):
    """Layers that each see the concatenation of the block input and all earlier outputs."""

    def __init__(self, in_channels: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(in_channels + i * growth, growth) for i in range(layers))
        self.out_channels = in_channels + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input with every layer's k channels appended."""
        # Keep the pieces apart and concatenate once per layer, not a growing running cat.
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(),
                         _conv(in_channels, out_channels, 1), nn.AvgPool2d(2))


def _dense_stages(channels: int, growth: int, layers: int) -> tuple[nn.Sequential, int]:
    # Three dense blocks; the transitions between them halve channels and resolution.
    stages = []
    for i in range(3):
        block = _DenseBlock(channels, growth, layers)
        stages.append(block)
        channels = block.out_channels
        if i < 2:
            stages.append(_transition(channels, channels // 2))
            channels //= 2
    return nn.Sequential(*stages), channels


class CifarDenseNetBC(_PooledLinearClassifier):
    """DenseNet-BC for 32x32 images: depth L, growth k, 3 blocks, compression 0.5."""

    def __init__(self, depth: int, growth: int, num_classes: int = 10, in_chans: int = 3):
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        super().__init__()
        self.stem = _conv(in_chans, 2 * growth, 3)
        self.blocks, width = _dense_stages(2 * growth, growth, layers=(depth - 4) // 6)
        self.final_norm = nn.BatchNorm2d(width)
        self._add_head(width, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map after the final BN-ReLU, (B, num_features, H/4, W/4)."""
        return F.relu(self.final_norm(self.blocks(self.stem(x))))


@register_model
def cifar_densenet_bc100(pretrained: bool = False, **kwargs) -> CifarDenseNetBC:
    """DenseNet-BC (L=100, k=12) for CIFAR, 0.8M parameters, 342 features."""
    return _build(CifarDenseNetBC, "cifar_densenet_bc100", pretrained, depth=100, growth=12,
                  **kwargs)


@register_model
def cifar_densenet_bc190(pretrained: bool = False, **kwargs) -> CifarDenseNetBC:
    """DenseNet-BC (L=190, k=40) for CIFAR, 25.6M parameters, 2190 features."""
    return _build(CifarDenseNetBC, "cifar_densenet_bc190", pretrained, depth=190, growth=40,
                  **kwargs)


# ---------------------------------------------------------------- ensembles (fasttt.export)


class SoftmaxAverage(nn.Module):
    """Several generations as one model: the mean of their softmax outputs (probabilities)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The members' mean class probabilities, (B, C)."""
        return torch.stack([m(images).float().softmax(dim=1) for m in self.members]).mean(0)


def _softmax_average(member: str, members: int, num_classes: int, **kwargs) -> SoftmaxAverage:
    return SoftmaxAverage([create_model(member, num_classes, **kwargs) for _ in range(members)])


@register_model
def fasttt_softmax_average(pretrained: bool = False, member: str = "", members: int = 0,
                           **kwargs) -> SoftmaxAverage:
    """An ensemble export: `members` networks of timm architecture `member`, softmax-averaged.

    Its config.json names them in model_args, so timm.create_model('local-dir:EXPORT',
    pretrained=True) builds it.
    """
    if not member or members < 1:
        raise UserError(f"{ENSEMBLE} is the model of an ensemble export (python -m "
                        "fasttt.export --ensemble): load one with timm.create_model("
                        "'local-dir:EXPORT', pretrained=True), or train a single network")
    return build_model_with_cfg(_softmax_average, ENSEMBLE, pretrained, member=member,
                                members=members, **kwargs)
