"""From a `lspt-sweep run` command line to the list of runs, checked before anything runs; the plan's identity.

A sweep folder holds one plan (SWEEP/plan.json). Its identity is what decides the runs' results: the protocol
(grids, seeds, splits), the tasks (name, folder, layout), the methods, the backbone (model, checkpoint) and
the lspt-train options passed after `--`. Running again with the same identity continues the sweep; a
different one is refused, with the differences listed. How the runs are executed (--launcher, --jobs) is not
part of it.

Runs (lspt-train --output folders):
    SWEEP/runs/<task>/<method>/grid/lr<lr>_wd<wd>_seed<seeds[0]>    selection split pair, one per grid point
    SWEEP/runs/<task>/<method>/final/lr<lr>_wd<wd>_seed<seed>       final split pair, the chosen point, per seed
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_helpers import UsageError
from .protocols import PRESETS, TASK_SETS, Protocol, standard_task

__all__ = ["MethodSpec", "TaskSpec", "RunSpec", "Plan", "parse_methods", "parse_grid", "resolve_tasks",
           "build_plan", "load_plan", "TRAINER_ENV", "trainer_command", "format_number", "PLAN_FILE"]

PLAN_FILE = "plan.json"
# The test hook: a command (shell words) that replaces `python -m lspt_kernels.train` for every run. It must
# take lspt-train's options and write what lspt-train writes (docs/sweep.md, "Testing the sweep").
TRAINER_ENV = "LSPT_SWEEP_TRAINER"
# Options the sweep sets for every run; given after `--` they are refused.
CONTROLLED = {"data": "--data-root / --tasks", "layout": "the task's layout", "train_split": "the protocol",
              "val_split": "the protocol", "model": "--model", "checkpoint": "--checkpoint", "method": "--methods",
              "lr": "--lr-grid", "weight_decay": "--wd-grid", "seed": "--seeds", "output": "--output",
              "resume": "the sweep (it resumes interrupted runs itself)"}
_FOLDER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=+-")


def format_number(x: float) -> str:
    """A grid value as folder names and tables show it: 5.0 -> '5', 0.0001 -> '0.0001' (exact: repr if %g
    would round)."""
    text = format(x, "g")
    return text if float(text) == x else repr(x)


def trainer_command() -> tuple[str, ...]:
    """The command that trains one run: this interpreter running lspt_kernels.train, unless TRAINER_ENV says
    otherwise."""
    custom = os.environ.get(TRAINER_ENV, "").strip()
    return tuple(shlex.split(custom)) if custom else (sys.executable, "-m", "lspt_kernels.train")


@dataclass(frozen=True)
class MethodSpec:
    label: str                    # as given in --methods, e.g. "lspt" or "lspt:cspc=none:lpc=none"
    method: str                   # an encoders.METHODS name
    options: dict = field(default_factory=dict)   # lspt-train dest -> value text, e.g. {"cspc": "none"}

    @property
    def folder(self) -> str:
        return self.label.replace(":", "+")

    def argv(self) -> list[str]:
        out = []
        for dest, value in self.options.items():
            out += [f"--{dest.replace('_', '-')}", value]
        return out


@dataclass(frozen=True)
class TaskSpec:
    name: str                     # the standard name (reports), or the user's folder name
    folder: str                   # absolute path
    layout: str                   # lspt_kernels.data layout
    benchmark: str | None         # "vtab" | "fgvc" | None
    group: str | None             # VTAB group
    sizes: dict = field(default_factory=dict)     # split -> images listed


@dataclass(frozen=True)
class RunSpec:
    """One lspt-train run, in plain types (a submitit job pickles it)."""
    run_id: str                   # "<task>/<method>/<grid|final>/lr.._wd.._seed.."
    folder: str                   # its lspt-train --output
    argv: tuple[str, ...]         # lspt-train options, without --resume
    trainer: tuple[str, ...]      # the command the options are given to
    epochs: int
    kind: str                     # "grid" | "final"
    task: str
    method: str                   # MethodSpec.label
    lr: float
    wd: float
    seed: int


def parse_grid(text: str, option: str, kind=float, positive: bool = False) -> tuple:
    """'0.1,1.0' -> (0.1, 1.0): finite, > 0 when `positive` else >= 0, no value twice."""
    values = []
    for item in (s.strip() for s in text.split(",")):
        try:
            value = kind(item)
        except ValueError:
            example = "42,44" if kind is int else "0.1,1.0"
            raise UsageError(f"{option}: {item!r} is not a{'n integer' if kind is int else ' number'} (expected a "
                             f"comma-separated list, e.g. {example})") from None
        if not math.isfinite(value):
            raise UsageError(f"{option}: {item!r} is not a finite number")
        if value < 0 or (positive and value == 0):
            raise UsageError(f"{option}: every value must be {'> 0' if positive else '>= 0'}, got {item}")
        if value in values:
            raise UsageError(f"{option}: {item} is listed twice")
        values.append(value)
    return tuple(values)


def parse_methods(text: str) -> list[MethodSpec]:
    """'lspt,gapt,lspt:cspc=none:lpc=none' -> MethodSpecs. A method's ':key=value' items are lspt-train options
    for that method's runs only (--key value), e.g. the ablations of the paper's table 3."""
    from ..encoders import METHODS
    out = []
    for label in (s.strip() for s in text.split(",")):
        name, *items = label.split(":")
        if name not in METHODS:
            raise UsageError(f"--methods: unknown method {name!r} (choose from {', '.join(sorted(METHODS))}; "
                             "options per method as lspt:cspc=none:lpc=none)")
        options = {}
        for item in items:
            key, sep, value = item.partition("=")
            dest = key.strip().lstrip("-").replace("-", "_")
            if not sep or not dest.isidentifier() or not value:
                raise UsageError(f"--methods {label}: expected METHOD:KEY=VALUE items (e.g. lspt:cspc=none), "
                                 f"got {item!r}")
            options[dest] = value.strip()
        if set(label) - _FOLDER_CHARS - {":"}:
            raise UsageError(f"--methods {label}: use letters, digits and . _ = + - only (it names folders)")
        if any(m.label == label for m in out):
            raise UsageError(f"--methods: {label} is listed twice")
        out.append(MethodSpec(label, name, options))
    return out


def _folder_index(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}


def _needed_splits(protocol: Protocol, layout: str) -> list[str]:
    pairs = protocol.split_pairs(layout)
    return list(dict.fromkeys(pairs["select"] + pairs["final"]))


def _split_files(layout: str) -> dict[str, str]:
    from ..data import FGVC_FILES, VTAB_FILES
    if layout == "vtab":
        return dict(VTAB_FILES)
    if layout == "fgvc":
        return dict(FGVC_FILES)
    return {s: f"{s}/" for s in ("train", "val", "test")}


def resolve_tasks(data_root, names: list[str], protocol: Protocol) -> list[TaskSpec]:
    """Each --tasks name to its folder under --data-root, with the splits the protocol needs. A task is a folder
    under --data-root: a standard name (or an alias) is looked for under its known folder names, any other name
    under itself; a name with no folder is an unknown task."""
    from ..data import DataError, load_dataset
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--data-root {data_root}: no such directory")
    index = _folder_index(root)
    expanded = [t for n in names for t in (TASK_SETS.get(n.lower(), (n,)))]
    out: list[TaskSpec] = []
    for name in expanded:
        std = standard_task(name)
        folder = next((index[f] for f in std.folder_names if f in index), None)
        if folder is None:
            tried = ", ".join(std.folder_names[:4]) + (" ..." if len(std.folder_names) > 4 else "")
            raise UsageError(f"--tasks {name}: unknown task: no folder {tried} under --data-root {root} (a task is "
                             f"a folder there; found {sorted(p.name for p in index.values())[:8]})")
        if any(t.name == std.name for t in out):
            raise UsageError(f"--tasks: {std.name} is listed twice")
        try:
            spec = load_dataset(folder, check_files=False)
        except DataError as exc:
            raise UsageError(f"--tasks {name} ({folder}): {exc}") from None
        files = _split_files(spec.layout)
        missing = [s for s in _needed_splits(protocol, spec.layout) if s not in spec.splits]
        if missing:
            raise UsageError(
                f"--tasks {name} ({folder}, layout {spec.layout}): the {protocol.name} protocol needs the splits "
                f"{', '.join(f'{s} ({files.get(s, s)})' for s in _needed_splits(protocol, spec.layout))}; "
                f"missing: {', '.join(f'{s} ({files.get(s, s)})' for s in missing)}")
        out.append(TaskSpec(std.name, str(folder), spec.layout, std.benchmark, std.group,
                            {k: len(v) for k, v in spec.splits.items()}))
    return out


def detect_backbone(checkpoint: str | None) -> str | None:
    """"mae" | "mocov3" | "other" from the checkpoint file's format (memory-mapped: the weights are not read);
    None without a checkpoint. A file torch cannot load is refused here, not in every run."""
    if checkpoint is None:
        return None
    import torch

    from ..checkpoints import is_mae_checkpoint, is_mocov3_checkpoint
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:           # legacy (non-zip) files cannot be memory-mapped
        try:
            obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"--checkpoint {checkpoint}: not a PyTorch checkpoint (torch.load with weights_only=True "
                             f"failed: {type(exc).__name__})") from None
    if not isinstance(obj, dict):
        return "other"
    if is_mae_checkpoint(obj):
        return "mae"
    if is_mocov3_checkpoint(obj):
        return "mocov3"
    return "other"


def _sentinel_argv(method: MethodSpec) -> list[str]:
    """The options the sweep sets, with values no user types: an option after -- that overrides one of them
    shows up as a changed value."""
    values = dict(data="<sweep:data>", layout="<sweep:layout>", train_split="<sweep:train>",
                  val_split="<sweep:val>", model="<sweep:model>", checkpoint="<sweep:checkpoint>",
                  method=method.method, lr="0.123456789", weight_decay="0.987654321", seed="987654321",
                  output="<sweep:output>")
    return [a for dest, value in values.items() for a in (f"--{dest.replace('_', '-')}", value)]


def check_train_args(train_args: list[str], methods: list[MethodSpec]):
    """Parse the options after -- (and each method's own) with lspt-train's parser: unknown options, options the
    sweep sets and method options a listed method does not take are errors now, not failed runs later.
    Returns the parsed namespace of the first method (epochs, device, ...)."""
    from .. import train
    from ..encoders import METHODS_WITHOUT_PROMPTS
    parser = train.build_parser()
    where = ["the lspt-train options after -- (" + (shlex.join(train_args) or "none") + ")"]

    def error(message):
        raise UsageError(f"{where[0]}: {message}")
    parser.error = error
    first = None
    for m in methods:
        base = _sentinel_argv(m)
        known = vars(parser.parse_args(base))
        for dest in m.options:
            if dest not in known or dest in CONTROLLED:
                raise UsageError(f"--methods {m.label}: {dest} is not an lspt-train option a method may set "
                                 "(see lspt-train --help)")
        where[0] = f"--methods {m.label}"
        alone = parser.parse_args(base + m.argv())
        where[0] = "the lspt-train options after -- (" + (shlex.join(train_args) or "none") + ")"
        ns = parser.parse_args(base + m.argv() + list(train_args))
        for dest in [*CONTROLLED, *m.options]:
            if getattr(ns, dest) != getattr(alone, dest):
                owner = CONTROLLED.get(dest, f"--methods {m.label}")
                error(f"--{dest.replace('_', '-')} is set by {owner}; remove it after --")
        for opt, (takers, _) in train.METHOD_OPTIONS.items():
            if getattr(ns, opt) is not None and m.method not in takers:
                source = f"--methods {m.label}" if opt in m.options else "the options after --"
                raise UsageError(f"--{opt.replace('_', '-')} ({source}) applies to {', '.join(takers)} only, not "
                                 f"{m.method}: give it per method, e.g. --methods {takers[0]}:"
                                 f"{opt.replace('_', '-')}={getattr(ns, opt)}")
        if m.method in METHODS_WITHOUT_PROMPTS and ns.num_prompts is not None:
            raise UsageError(f"--num-prompts: {m.method} has no prompts; give it per method, e.g. --methods "
                             f"lspt:num-prompts={ns.num_prompts}")
        if first is None:
            first = ns
    return first


@dataclass
class Plan:
    root: Path                    # the sweep folder
    protocol: Protocol
    tasks: list[TaskSpec]
    methods: list[MethodSpec]
    model: str
    checkpoint: str | None
    train_args: list[str]
    epochs: int
    backbone: str | None          # "mae" | "mocov3" | "other" | None (no checkpoint)
    paper_backbone: str | None    # the backbone whose published numbers the report shows, or None
    paper_note: str
    trainer: tuple[str, ...] = field(default_factory=trainer_command)
    device: str | None = None     # lspt-train's --device of the runs (decides whether a local sweep uses GPUs)

    def identity(self) -> dict:
        return dict(protocol=self.protocol.to_dict(), tasks=[dict(name=t.name, folder=t.folder, layout=t.layout)
                                                            for t in self.tasks],
                    methods=[m.label for m in self.methods], model=self.model, checkpoint=self.checkpoint,
                    train_args=list(self.train_args))

    def to_dict(self) -> dict:
        return dict(format=1, identity=self.identity(), epochs=self.epochs, backbone=self.backbone,
                    paper_backbone=self.paper_backbone, paper_note=self.paper_note,
                    tasks=[vars(t) for t in self.tasks],
                    methods=[dict(label=m.label, method=m.method, options=m.options) for m in self.methods])

    def cells(self):
        """(task, method) pairs in report order."""
        return [(t, m) for m in self.methods for t in self.tasks]

    def _run(self, kind, task: TaskSpec, method: MethodSpec, lr, wd, seed) -> RunSpec:
        name = f"lr{format_number(lr)}_wd{format_number(wd)}_seed{seed}"
        run_id = f"{task.name}/{method.folder}/{kind}/{name}"
        folder = self.root / "runs" / run_id
        train, scored = self.protocol.split_pairs(task.layout)["select" if kind == "grid" else "final"]
        argv = ["--data", task.folder, "--layout", task.layout, "--train-split", train, "--val-split", scored,
                "--model", self.model, *(["--checkpoint", self.checkpoint] if self.checkpoint else []),
                "--method", method.method, *method.argv(), "--lr", repr(float(lr)), "--weight-decay",
                repr(float(wd)), "--seed", str(seed), "--output", str(folder), *self.train_args]
        return RunSpec(run_id, str(folder), tuple(argv), tuple(self.trainer), self.epochs, kind, task.name,
                       method.label, float(lr), float(wd), int(seed))

    def grid_runs(self, task: TaskSpec, method: MethodSpec) -> list[RunSpec]:
        # The official loop order: lr as listed, then wd (tune_fgvc.py:158-159).
        return [self._run("grid", task, method, lr, wd, self.protocol.seeds[0])
                for lr in self.protocol.lrs for wd in self.protocol.wds]

    def final_runs(self, task: TaskSpec, method: MethodSpec, lr: float, wd: float) -> list[RunSpec]:
        return [self._run("final", task, method, lr, wd, s) for s in self.protocol.seeds]

    def workload(self) -> tuple[int, int]:
        """(training images, evaluation images) the whole sweep processes: every run trains its train split and
        evaluates its scored split once per epoch (--limit-train-batches not counted)."""
        train = evaluated = 0
        runs = {"select": len(self.protocol.lrs) * len(self.protocol.wds), "final": len(self.protocol.seeds)}
        for task in self.tasks:
            for stage, (tr, ev) in self.protocol.split_pairs(task.layout).items():
                n = runs[stage] * self.epochs * len(self.methods)
                train += n * task.sizes.get(tr, 0)
                evaluated += n * task.sizes.get(ev, 0)
        return train, evaluated

    def size(self) -> tuple[int, int]:
        """(grid runs, final runs) in the whole sweep."""
        cells = len(self.tasks) * len(self.methods)
        return cells * len(self.protocol.lrs) * len(self.protocol.wds), cells * len(self.protocol.seeds)


def _paper_backbone(model: str, backbone: str | None, ns) -> tuple[str | None, str]:
    if backbone not in ("mae", "mocov3"):
        return None, ("The paper's numbers are not shown: they are for MAE / MoCo v3 checkpoints "
                      f"(this sweep's --checkpoint: {backbone or 'none, a random backbone'})")
    if model != "vit_base_patch16_224" or ns.img_size not in (None, 224) or ns.model_kwargs:
        return None, ("The paper's numbers are not shown: they are for vit_base_patch16_224 at 224 px without "
                      f"--model-kwargs (this sweep: {model}, img size {ns.img_size or 'default'}, model kwargs "
                      f"{ns.model_kwargs or 'none'})")
    from .paper import BACKBONES
    return backbone, f"The LSPT paper's tables 1-3, {BACKBONES[backbone]} pre-trained ViT-B/16"


def build_plan(output, data_root, tasks: list[str], methods: str, model: str, checkpoint: str | None,
               protocol: str, lr_grid: str | None, wd_grid: str | None, seeds: str | None,
               train_args: list[str]) -> Plan:
    """Every check that needs no training, in the order a user would fix them; nothing is written."""
    if protocol not in PRESETS:
        raise UsageError(f"--protocol must be one of {', '.join(PRESETS)}, got {protocol!r}")
    p = PRESETS[protocol]
    p = Protocol(p.name, parse_grid(lr_grid, "--lr-grid", positive=True) if lr_grid else p.lrs,
                 parse_grid(wd_grid, "--wd-grid") if wd_grid else p.wds,
                 parse_grid(seeds, "--seeds", int) if seeds else p.seeds, p.splits, p.source)
    method_specs = parse_methods(methods)
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise UsageError(f"--checkpoint {checkpoint}: no such file")
        checkpoint = str(ckpt.resolve())
    ns = check_train_args(train_args, method_specs)
    task_specs = resolve_tasks(data_root, tasks, p)
    backbone = detect_backbone(checkpoint)
    paper_backbone, note = _paper_backbone(model, backbone, ns)
    return Plan(Path(output).expanduser().resolve(), p, task_specs, method_specs, model, checkpoint,
                list(train_args), ns.epochs, backbone, paper_backbone, note, device=ns.device)


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key in now:
        if saved.get(key) != now[key]:
            out.append(f"{key}: saved {json.dumps(saved.get(key))[:160]}, now {json.dumps(now[key])[:160]}")
    return out


def claim_folder(plan: Plan) -> bool:
    """Write SWEEP/plan.json, or check that the one there is this plan. Returns True for a new sweep."""
    root = plan.root
    path = root / PLAN_FILE
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output {root} exists and is not a directory")
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = _differences(saved.get("identity", {}), plan.identity())
        if diff:
            raise UsageError(f"--output {root} holds another sweep (its {PLAN_FILE} differs): " + "; ".join(diff[:4])
                             + ". Rerun with that sweep's settings, or choose another --output (nothing was changed)")
        return False
    if root.is_dir() and any(root.iterdir()):
        raise UsageError(f"--output {root} is not empty and holds no sweep ({PLAN_FILE}): choose a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=2))
    os.replace(tmp, path)
    return True


def load_plan(sweep) -> Plan:
    """The plan a sweep folder holds (for `lspt-sweep report`)."""
    root = Path(sweep).expanduser().resolve()
    path = root / PLAN_FILE
    if not path.is_file():
        raise UsageError(f"{sweep}: not a sweep folder (no {PLAN_FILE}); `lspt-sweep run --output {sweep}` makes one")
    data = json.loads(path.read_text())
    ident = data["identity"]
    pr = ident["protocol"]
    preset = PRESETS.get(pr["name"])
    protocol = Protocol(pr["name"], tuple(pr["lrs"]), tuple(pr["wds"]), tuple(pr["seeds"]), pr["splits"],
                        preset.source if preset else "")
    tasks = [TaskSpec(**t) for t in data["tasks"]]
    methods = [MethodSpec(m["label"], m["method"], dict(m["options"])) for m in data["methods"]]
    return Plan(root, protocol, tasks, methods, ident["model"], ident["checkpoint"], list(ident["train_args"]),
                data["epochs"], data["backbone"], data["paper_backbone"], data["paper_note"])
