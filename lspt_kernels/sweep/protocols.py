"""The tuning protocols (presets) with their sources, and the standard benchmark task names.

A protocol is a grid (learning rates x weight decays), the seeds, and which splits train and score the grid
runs and the final runs. For every (method, task) cell: train each grid point on the selection split pair,
score the last epoch, pick the best (selection.py), then train the chosen point once per seed on the final
split pair and report the mean and std of the last epoch's top-1.

Sources: the official VPT code (KMnP/vpt @ 7f3942e) and GaPT (ryongithub/GatedPromptTuning @ dd7d1ea).
The learning rates are base rates for a batch of 256: `lspt-train --lr` already scales them by batch / 256
(as tune_vtab.py:100 / tune_fgvc.py:31 do), so a grid value is passed to it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Protocol", "PRESETS", "SPLITS", "VTAB_GROUPS", "FGVC_TASKS", "TASK_SETS", "StandardTask",
           "standard_task", "preset_help"]

# Split pairs (train split, scored split) in lspt-train's split names (--train-split / --val-split).
# "trainval" is VTAB-1k's train800val200.
SPLITS = {
    "vtab": dict(select=("train", "val"), final=("trainval", "test")),
    "fgvc": dict(select=("train", "val"), final=("train", "test")),
}


@dataclass(frozen=True)
class Protocol:
    name: str
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    seeds: tuple[int, ...]         # the grid runs use seeds[0]; the final runs use every seed
    splits: str                    # a key of SPLITS, or "auto": by each task's layout (vtab -> vtab, else fgvc)
    source: str                    # where every number above comes from

    def split_pairs(self, layout: str) -> dict[str, tuple[str, str]]:
        """{"select": (train, scored), "final": (train, scored)} for a task of this on-disk layout."""
        key = self.splits if self.splits != "auto" else ("vtab" if layout == "vtab" else "fgvc")
        return SPLITS[key]

    def to_dict(self) -> dict:
        return dict(name=self.name, lrs=list(self.lrs), wds=list(self.wds), seeds=list(self.seeds),
                    splits=self.splits)


VPT_SEEDS = (42, 44, 82, 100, 800)
PRESETS = {
    "vpt-vtab": Protocol(
        "vpt-vtab", lrs=(5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05), wds=(0.01, 0.001, 0.0001, 0.0),
        seeds=VPT_SEEDS, splits="vtab",
        source="KMnP/vpt tune_vtab.py: lr x wd grid for prompts :245-251 (train_type 'prompt'), trained on "
               "train800 and scored on val200 at the last epoch :97-103 :157-160 :56-57, ties to the smaller lr "
               ":63-71, then train800val200 -> test :166-173 with seeds [42, 44, 82, 100, 800] :284-285"),
    "vpt-fgvc": Protocol(
        "vpt-fgvc", lrs=(5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1), wds=(0.01, 0.001, 0.0001, 0.0),
        seeds=VPT_SEEDS, splits="fgvc",
        source="KMnP/vpt tune_fgvc.py: lr x wd grid for prompts :151-159 (VTAB's without 0.05); the script "
               "trains on train and scores val and test but picks nothing itself: here the VTAB rule on val "
               "(last epoch, ties to the smaller lr), then train -> test with VPT's five seeds (tune_vtab.py:284)"),
    "gapt": Protocol(
        "gapt", lrs=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), wds=(0.0,), seeds=(42,), splits="auto",
        source="GaPT paper (Yoo et al., ICML 2023), implementation details: lr in {0.05, ..., 5.0}; weight decay "
               "0 and seed 42 as ryongithub/GatedPromptTuning run.sh:146 and :135 (the repository ships no "
               "tuning script); splits as VPT for the task's layout (VTAB-1k lists: the vpt-vtab pairs; else "
               "train -> val, train -> test)"),
}


def preset_help() -> str:
    """The presets and their sources, for `lspt-sweep run --help`."""
    lines = ["protocols (--protocol; --lr-grid / --wd-grid / --seeds override a preset's values):"]
    for p in PRESETS.values():
        pairs = ("by the task's layout" if p.splits == "auto" else
                 "; ".join(f"{k} {a} -> {b}" for k, (a, b) in SPLITS[p.splits].items()))
        lines += [f"  {p.name}: lr {list(p.lrs)}, wd {list(p.wds)}, seeds {list(p.seeds)}; splits: {pairs}",
                  f"      source: {p.source}"]
    lines.append("  every lr is the base lr for a batch of 256 (lspt-train --lr scales it by batch / 256)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# standard tasks: the names the reports use, their groups, and the folder names they are found under
# ----------------------------------------------------------------------------------------------------------
# VTAB-1k: the 19 tasks by group, named as the folders of the NOAH VTAB-1k preparation
# (ZhangYuanhan-AI/NOAH data/vtab-source/get_vtab1k.py), which VPT/GaPT-style list layouts use.
VTAB_GROUPS = {
    "Natural": ("caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}
FGVC_TASKS = ("cub", "flowers", "cars", "dogs", "nabirds")
# Other folder names a task is found under (compared case-insensitively): VPT's DATA.NAME spellings with the
# "vtab-" prefix (GaPT run.sh:40-120), NOAH's script names (cifar100, oxford_pet), and the FGVC folder names
# of the VPT configs (configs/prompt/*.yaml DATA.NAME) and GaPT's run.sh:14-35.
_ALIASES = {
    "cifar": ("cifar100",),
    "oxford_iiit_pet": ("oxford_pet",),
    "cub": ("cub_200_2011", "cub200"),
    "flowers": ("oxfordflowers", "oxford_flowers"),
    "cars": ("stanfordcars", "stanford_cars", "stanford-cars"),
    "dogs": ("stanforddogs", "stanford_dogs", "stanford-dogs"),
}
# --tasks shorthands.
TASK_SETS = {"vtab": sum(VTAB_GROUPS.values(), ()), "fgvc": FGVC_TASKS,
             **{f"vtab-{g.lower()}": names for g, names in VTAB_GROUPS.items()}}


@dataclass(frozen=True)
class StandardTask:
    name: str                   # the name reports use
    benchmark: str | None       # "vtab" | "fgvc" | None (a user's own task)
    group: str | None           # VTAB group, None otherwise
    folder_names: tuple[str, ...]   # lower-case folder names it is found under, in order of preference


def standard_task(name: str) -> StandardTask:
    """The standard task a --tasks name means (by its name or an alias); a user's own task otherwise (found
    only under its own folder name, with no benchmark group)."""
    key = name.lower()
    for canon in TASK_SETS["vtab"] + FGVC_TASKS:
        names = (canon, *_ALIASES.get(canon, ()))
        if key in names or (key.startswith("vtab-") and key[5:] in names):
            bench = "fgvc" if canon in FGVC_TASKS else "vtab"
            group = next((g for g, ts in VTAB_GROUPS.items() if canon in ts), None)
            folders = names + tuple(f"vtab-{n}" for n in names) if bench == "vtab" else names
            return StandardTask(canon, bench, group, folders)
    return StandardTask(name, None, None, (key,))
