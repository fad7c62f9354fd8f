"""A trained generation (or an ensemble of them) as a model people can load without fasttt's run.

    python -m fasttt.export runs/NAME OUT_DIR                    # the last generation
    python -m fasttt.export runs/NAME OUT_DIR --generation 2
    python -m fasttt.export runs/NAME OUT_DIR --ensemble         # softmax average of 0..last
    python -m fasttt.export runs/NAME OUT_DIR --ensemble --generation 2   # ... of 0..2
    python -m fasttt.export runs/NAME OUT_DIR --onnx             # also model.onnx

OUT_DIR receives `model.safetensors` and `config.json` in timm's layout (architecture,
num_classes, label_names and a pretrained_cfg with input size, mean, std, interpolation
and crop fraction; an ensemble's architecture is `fasttt_softmax_average`, its members in
model_args), so either kind loads in timm itself, with the run's data config:

    import timm, fasttt.models  # the import registers fasttt's networks in timm
    model = timm.create_model("local-dir:OUT_DIR", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=model)  # the run's evaluation view

`load_export(OUT_DIR)` does the same; `fasttt.predict.preprocess(images, data_config)` is
the run's evaluation view (timm's own transform resizes before it crops: it differs on
images of another size), and `python -m fasttt.predict OUT_DIR IMAGE...` classifies images.

OUT_DIR is replaced whole, so it must be new, empty, or an earlier export holding nothing
but what that export wrote (its `.fasttt-export` lists them), and lie outside every run
and the current directory; anything else is refused in one line, untouched (files.py).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from fasttt.betons import read_manifest
from fasttt.checkpoint import load_weights, save_weights
from fasttt.errors import OneLineParser, UserError, exit_on_user_error
from fasttt.files import staged_dir, write_atomically, write_json
from fasttt.models import ENSEMBLE, SoftmaxAverage, build_model, create_model
from fasttt.recipe import AugmentConfig, load_recipe
from fasttt.rundir import RECIPE, finished_generations, generation_weights, read_eval

CONFIG, WEIGHTS, ONNX = "config.json", "model.safetensors", "model.onnx"
MARKER = ".fasttt-export"  # in every export: a rerun may replace the directory (files.py)
USAGE = "python -m fasttt.export RUN_DIR OUT_DIR [--generation M] [--ensemble] [--onnx]"


def pretrained_cfg(augment: AugmentConfig, num_classes: int, architecture: str = "") -> dict:
    """timm's pretrained_cfg for the run's evaluation view (fasttt.augment.eval_view).

    With a timm `architecture`, also its first conv and classifier, which timm adapts when
    a user asks for other input channels or classes.
    """
    size = augment.eval_size
    known = timm.models.get_pretrained_cfg(architecture) if architecture else None
    return {"input_size": [3, size, size], "mean": list(augment.mean), "std": list(augment.std),
            "interpolation": "bilinear", "crop_pct": augment.eval_crop_ratio,
            "crop_mode": "center", "num_classes": num_classes,
            **({"first_conv": known.first_conv, "classifier": known.classifier} if known else {})}


def write_onnx(model: nn.Module, config: dict, path: Path) -> None:
    """The model as ONNX (opset of torch's exporter), any batch size, via torch.onnx."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; an optional dependency)
    except ImportError:
        raise UserError("--onnx needs the optional ONNX packages: pip install "
                        "'fasttt[onnx]' (onnx, onnxscript, onnxruntime)") from None
    example = torch.zeros(2, *config["pretrained_cfg"]["input_size"])
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, verbose=False,
                                input_names=["images"], output_names=[config["fasttt"]["outputs"]],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    write_atomically(path, lambda f: f.write(program.model_proto.SerializeToString()))


def export_command(run_dir: Path, generation: int | None, ensemble: bool, onnx: bool) -> str:
    """The command line of this export into NEW_DIR: a refusal's advice."""
    flags = [*(["--generation", str(generation)] if generation is not None else []),
             *(["--ensemble"] if ensemble else []), *(["--onnx"] if onnx else [])]
    return shlex.join(["python", "-m", "fasttt.export", str(run_dir), "NEW_DIR", *flags])


def export(run_dir: Path, out_dir: Path, generation: int | None, ensemble: bool,
           onnx: bool = False) -> dict:
    """Write generation `generation` (default: the last finished) or the ensemble 0..it."""
    if not (run_dir / RECIPE).is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {RECIPE}): give "
                        "runs/<name>")
    recipe = load_recipe(run_dir / RECIPE)
    finished = finished_generations(run_dir)
    if not finished:
        raise UserError(f"{run_dir} has no finished generation yet: train it first")
    m = finished[-1] if generation is None else generation
    if m not in finished:
        raise UserError(f"generation {m} of {run_dir} has not finished (finished: "
                        f"0..{finished[-1]}): give --generation 0..{finished[-1]}")
    names = [str(n) for n in read_manifest(recipe.data.beton_dir)["class_names"]]
    members = list(range(m + 1)) if ensemble else [m]
    member = recipe.model.name
    config = {
        "architecture": ENSEMBLE if ensemble else member, "num_classes": len(names),
        "label_names": names,
        **({"model_args": {"member": member, "members": len(members)}} if ensemble else {}),
        "pretrained_cfg": pretrained_cfg(recipe.augment, len(names), "" if ensemble else member),
        "fasttt": {"run": recipe.run.name, "generations": members,
                   "outputs": "probabilities" if ensemble else "logits",
                   "val_top1": [read_eval(run_dir, k)["last"]["val_top1"] for k in members]},
    }
    command = export_command(run_dir, generation, ensemble, onnx)
    # Refused before anything is loaded or written; a half-written export never has the name.
    with staged_dir(out_dir, MARKER, command) as staging:
        networks = []
        for k in members:
            network = build_model(recipe.model, recipe.run, len(names), seed=0)
            load_weights(network, generation_weights(run_dir, k))  # verified against eval.json
            networks.append(network)
        model = SoftmaxAverage(networks) if ensemble else networks[0]
        save_weights(model, staging / WEIGHTS)
        write_json(staging / CONFIG, config)
        if onnx:
            write_onnx(model, config, staging / ONNX)
    return config


def load_export(out_dir: Path | str) -> tuple[nn.Module, dict]:
    """An exported model, in eval mode, and its config.json."""
    out_dir = Path(out_dir)
    try:
        config = json.loads((out_dir / CONFIG).read_bytes())
        arch, classes = config["architecture"], config["num_classes"]
        members = config["fasttt"]["generations"]
        ensemble = config["fasttt"]["outputs"] == "probabilities"
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{out_dir} holds no readable {CONFIG} ({type(err).__name__}): export "
                        "again with `python -m fasttt.export RUN_DIR OUT_DIR`") from None
    if ensemble and arch != ENSEMBLE:  # written before ensembles loaded in timm
        model = SoftmaxAverage([create_model(arch, classes) for _ in members])
        load_weights(model, out_dir / WEIGHTS)
    else:  # through timm's own loading, as the README shows a user
        model = timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    return model.eval(), config


def main(argv: list[str] | None = None) -> None:
    """Export one generation or an ensemble of a run to OUT_DIR."""
    parser = OneLineParser(prog="python -m fasttt.export", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("run_dir", type=Path, help="a run directory, runs/<name>")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--generation", type=int, help="default: the last finished one")
    parser.add_argument("--ensemble", action="store_true",
                        help="the softmax average of generations 0..M as one model")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (needs pip install 'fasttt[onnx]')")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = export(args.run_dir, args.out_dir, args.generation, args.ensemble, args.onnx)
    what = config["fasttt"]["generations"]
    arch = config.get("model_args", {}).get("member", config["architecture"])
    print(f"wrote {args.out_dir}: {arch}, "
          f"{'ensemble of generations ' if len(what) > 1 else 'generation '}"
          f"{', '.join(map(str, what))}, {config['num_classes']} classes")


if __name__ == "__main__":
    exit_on_user_error(main)
