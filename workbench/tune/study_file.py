"""Study definitions (TOML), validated so that a mistake names its field."""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workbench.loadgen.config import LoadProfile
from workbench.tune.capacity import CapacitySpec

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
DEFAULT_STUDY = Path(__file__).with_name("default.toml")


# Searched keys whose "off" value the defaults trial runs with (it has no value of its own for them).
OFF_VALUES = {"num_speculative_tokens": 0}
SPECULATIVE_FLAGS = ("speculative_model", "speculative_config")


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file and the field."""


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical", "bool"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.type in ("float", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical parameter needs a non-empty list of choices")
        return self


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str
    direction: Literal["maximize", "minimize"]


class Constraint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str
    op: Literal["<=", ">=", "=="] = "<="
    value: float

    def violation(self, metrics: dict) -> float:
        """Optuna's convention: <= 0 when satisfied. A missing metric is a violation."""
        v = metrics.get(self.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return 1.0
        if self.op == "<=":
            return v - self.value
        if self.op == ">=":
            return self.value - v
        return abs(v - self.value)


class Workload(LoadProfile):
    """A `bench serve` profile (the load generator's settings but base_url/model), or a `bench
    throughput` profile (offline, in a subprocess with the trial's engine flags)."""
    type: Literal["serve", "throughput"] = "serve"
    request_rate: float | Literal["inf"] = "inf"
    ignore_eos: bool = True


class StudyMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    sampler: Literal["tpe", "nsga2", "grid", "random"] = "tpe"
    seed: int = 0
    startup_timeout: float = Field(300.0, gt=0)  # seconds a server may take to become healthy
    trial_timeout: float = Field(1800.0, gt=0)  # seconds a trial's workload may take
    baseline: bool = True  # trial 0 runs the defaults: only the [server] flags
    repeats: int = Field(1, ge=1)  # runs per trial against one server; the median is the value
    # Interleaved re-runs of the best and the defaults (>= 4 to tell); "validate" in TOML (BaseModel has a validate).
    validate_rounds: int = Field(0, ge=0, alias="validate")
    validate_top: int = Field(2, ge=1)  # how many of the best configurations to re-run
    prune: float | None = Field(None, gt=0, le=1)  # stop a trial after its first repeat below this share of the best
    device_memory: str | None = None  # for the memory pre-check, e.g. "80GiB"; default: this machine's GPU


class StudyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: StudyMeta
    server: dict[str, Any] = Field(default_factory=dict)  # fixed flags for every trial
    search_space: dict[str, Param]
    workload: Workload = Field(default_factory=Workload)
    objectives: list[Objective] = Field(min_length=1)
    constraints: list[Constraint] = Field(default_factory=list)
    capacity: CapacitySpec | None = None  # set: each run searches the highest load that meets the SLO

    @model_validator(mode="after")
    def _check(self) -> StudyFile:
        if self.study.n_trials is None and self.study.timeout is None:
            raise ValueError("study: give n_trials or timeout (or both)")
        if self.study.sampler == "grid" and any(p.type == "float" and p.step is None
                                               for p in self.search_space.values()):
            raise ValueError("search_space: a grid sampler needs a step on every float parameter")
        if self.capacity is not None and self.workload.type != "serve":
            raise ValueError("capacity: the SLO capacity search needs a serve workload")
        if self.study.validate_rounds == 1:
            raise ValueError("study.validate: give 0 (off) or at least 2 re-runs a side")
        clash = set(self.search_space) & set(self.server)
        if clash:
            raise ValueError(f"server and search_space both set {sorted(clash)}")
        if "num_speculative_tokens" in self.search_space and not any(
                k in self.server or k in self.search_space for k in SPECULATIVE_FLAGS):
            raise ValueError('search_space.num_speculative_tokens needs server.speculative_model (e.g. "[ngram]" '
                             "or a draft model); 0 means no speculation")
        return self

    def default_flags(self) -> dict:
        """The defaults trial's flags: the [server] flags, and searched keys that need a value, off."""
        return dict(self.server) | {k: v for k, v in OFF_VALUES.items() if k in self.search_space}


def find_study(name_or_path: str | None) -> Path:
    """A path, a name from studies/ (next to the package or in the working directory), or the default."""
    if name_or_path is None:
        return DEFAULT_STUDY
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (Path.cwd() / "studies", STUDIES_DIR):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    if name_or_path == "default":
        return DEFAULT_STUDY
    known = sorted(p.stem for p in STUDIES_DIR.glob("*.toml")) if STUDIES_DIR.is_dir() else ["default"]
    raise StudyError(f"no study file {name_or_path!r}; give a path or one of: {', '.join(known)}")


def load_study(path: Path) -> tuple[StudyFile, str]:
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML: {exc}") from None
    try:
        return StudyFile.model_validate(data), text
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise StudyError(f"{path}: {where}: {err['msg']}") from None
