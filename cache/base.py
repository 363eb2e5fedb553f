"""The step cache: one object per generation, shared by the experts, consulted where the block loop runs.

A forward becomes three block ranges: the front blocks, the middle span, the back blocks. Before the middle,
each CFG branch (one batch row) asks the policy whether to compute it; rows that compute run the middle as a
sub-batch, rows that skip add their cached (or Taylor-forecast) middle residual. When no row computes, the
middle is never handed to the inner runner, so with block offload its weights never move. The offload engine
asks `will_run(ahead, block)` before prefetching, so it only copies blocks that will run.

State is keyed by (expert, branch): cond and uncond keep separate residuals and counters, and the switch to the
next expert starts from scratch (its warm-up included).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from wanlite.cache.config import CacheConfig, span

POLICIES: dict[type, type] = {}


def register_cache(config_cls: type):
    """Class decorator: the policy that serves `config_cls`."""
    def wrap(policy_cls: type) -> type:
        POLICIES[config_cls] = policy_cls
        return policy_cls
    return wrap


@dataclass(frozen=True)
class StepInfo:
    step: int  # global sampler step
    index: int  # step index within the current expert
    expert_steps: int | None  # how many steps this expert runs (None: unknown)
    total_steps: int | None  # steps of the whole run
    role: str
    branch: str


@dataclass
class BranchState:
    """One (expert, branch)'s cache: the last computed span residual as Taylor terms, the front residual it was
    compared against, and the policy's counters."""

    terms: list[torch.Tensor] = field(default_factory=list)  # d^i R / dk^i at `last`; terms[0] = R itself
    last: float = float("nan")  # the step of the last computed residual (TaylorSeer expands in the step
    # index: on the tiny models it forecasts better than expanding in sigma, bench note in README)
    front_ref: torch.Tensor | None = None
    consecutive: int = 0
    cached: int = 0
    counters: dict = field(default_factory=dict)  # policy-specific (MagCache accumulators)

    def record(self, position: float, residual: torch.Tensor, order: int) -> None:
        """A computed step: refresh the divided differences up to `order` (TaylorSeer's recursion)."""
        old, self.terms = self.terms, []
        terms = [residual]
        if order > 0 and old and position != self.last:
            for i in range(min(order, len(old))):
                term = terms[i] - old[i]
                old[i] = None  # each old term is freed once used: at most one extra [L, d] lives meanwhile
                terms.append(term.div_(position - self.last))
        self.terms, self.last = terms, position

    def forecast(self, position: float) -> torch.Tensor:
        """The span residual at `position`: sum_i terms[i] * (position - last)^i / i!."""
        out = self.terms[0]
        dk = position - self.last
        for i, term in enumerate(self.terms[1:], start=1):
            out = out + term * (dk**i / math.factorial(i))
        return out


class CachePolicy:
    """Decides, per branch and step, whether the middle span is computed. `forced` must not change state (the
    offload engine calls it for the next step); `commit` updates the counters once the step is done."""

    needs_signal = False  # True: `decide` compares the front blocks' residual with the last computed one
    order = 0  # Taylor order of the forecast (0: reuse the last residual)

    def __init__(self, config: CacheConfig):
        self.config = config

    def forced(self, state: BranchState, info: StepInfo) -> bool | None:
        """True: compute; False: skip; None: depends on the front residual (only if needs_signal)."""
        raise NotImplementedError

    def decide(self, state: BranchState, info: StepInfo, diff: float) -> bool:
        return True

    def state_dict(self) -> dict:
        """The policy's own record across steps (plain values), for a resume file; most policies keep none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def commit(self, state: BranchState, info: StepInfo, computed: bool) -> None:
        if computed:
            state.consecutive = 0
        else:
            state.consecutive += 1
            state.cached += 1


@dataclass
class CacheStats:
    block_evals: int = 0  # block forwards actually run, counted per batch row
    block_evals_total: int = 0  # what running every block for every row would have been
    steps: int = 0  # branch-steps seen
    steps_cached: int = 0  # branch-steps whose middle span was skipped
    forwards_without_middle: int = 0  # forwards where no branch ran the middle (no weights moved for it)

    def to_dict(self) -> dict:
        saved = self.block_evals_total / self.block_evals if self.block_evals else 1.0
        skipped = 1 - self.block_evals / self.block_evals_total if self.block_evals_total else 0.0
        return {"block_evals": self.block_evals, "block_evals_total": self.block_evals_total,
                "skipped_fraction": round(skipped, 4), "block_evals_saved_x": round(saved, 3),
                "branch_steps_cached": self.steps_cached, "branch_steps": self.steps,
                "forwards_without_middle": self.forwards_without_middle}


class CachedRunner(functools.partial):
    """`WanDiT.runner` with a step cache in front of another runner (the plain loop or the offload engine):
    `StepCache.run` bound to them. A partial, not a method: no extra frame keeps the block input alive."""

    @property
    def cache(self) -> "StepCache":
        return self.func.__self__

    @property
    def inner(self):
        return self.args[0]


class StepCache:
    """The step cache of one generation. `begin(step, role, branches)` is called by the Denoiser before each
    forward; without it each forward counts as the next step and every batch row as its own branch."""

    def __init__(self, config: CacheConfig):
        config.check()
        self.config = config
        self.policy: CachePolicy = POLICIES[type(config)](config)
        self.front, self.back = span(config)
        self.states: dict[tuple[str, str], BranchState] = {}
        self.schedule: list[str] | None = None
        self.step, self.role, self.expert_start = -1, None, 0
        self.branches: tuple[str, ...] = ()
        self.begun = False
        self.decision: bool | None = None  # does the current forward run its middle span?
        self.computing: set[str] = set()  # branches whose middle span the current forward computes
        self.num_blocks: int | None = None
        self.stats = CacheStats()
        self.attached: list = []  # (model, runner it replaced)
        # several ranks, each holding a slice of the tokens (wanlite.parallel): the mean of a signal over all of
        # them, so every rank takes the same decision
        self.signal_mean = None

    # ---------------------------------------------------------------- wiring
    def attach(self, model: torch.nn.Module, role: str = "model") -> torch.nn.Module:
        """Put the cache in front of `model`'s runner (idempotent); an offloading runner is told what will run."""
        if isinstance(model.runner, CachedRunner) and model.runner.cache is self:
            return model
        self.config.check(len(model.blocks))
        inner = model.runner
        self.attached.append((model, inner))
        model.runner = CachedRunner(self.run, inner, role)
        expect = getattr(inner, "expect", None)
        if expect is not None:
            expect(self.will_run)
        return model

    def detach(self) -> None:
        for model, inner in self.attached:
            if isinstance(model.runner, CachedRunner) and model.runner.cache is self:
                model.runner = inner
            expect = getattr(inner, "expect", None)
            if expect is not None:
                expect(None)
        self.attached.clear()
        self.states.clear()

    def set_schedule(self, schedule: list[str]) -> None:
        """The expert of every step (from `Denoiser.schedule()`): per-expert step counts and lookahead."""
        self.schedule = list(schedule)

    def begin(self, step: int, role: str, branches: tuple[str, ...]) -> None:
        """Before each forward: the step, the expert and each batch row's branch."""
        if role != self.role:  # a new expert starts from scratch: its residuals mean nothing to the other
            self.states = {k: v for k, v in self.states.items() if k[0] == role}
            self.role, self.expert_start = role, step
        self.step, self.branches, self.begun, self.decision = step, tuple(branches), True, None
        self.computing = set()

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        """What the next step reads, as plain tensors and numbers (a resume file keeps it): each branch's
        Taylor terms, reference and counters, the current expert and where it started, the policy's own record
        and the statistics. The tensors are the live ones (no copy): a step replaces them, never writes them."""
        return {"role": self.role, "expert_start": self.expert_start, "step": self.step,
                "stats": dict(vars(self.stats)), "policy": self.policy.state_dict(),
                "branches": [{"role": role, "branch": branch, "terms": list(s.terms), "last": s.last,
                              "front_ref": s.front_ref, "consecutive": s.consecutive, "cached": s.cached,
                              "counters": dict(s.counters)} for (role, branch), s in self.states.items()]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Continue from `state_dict()`, its tensors moved to `device`."""
        on = lambda t: None if t is None else t.to(device)  # noqa: E731
        self.role, self.expert_start, self.step = state["role"], int(state["expert_start"]), int(state["step"])
        self.stats = CacheStats(**state["stats"])
        self.policy.load_state_dict(state["policy"])
        self.states = {(b["role"], b["branch"]): BranchState(
            [on(t) for t in b["terms"]], float(b["last"]), on(b["front_ref"]), int(b["consecutive"]), int(b["cached"]),
            {k: on(v) if isinstance(v, torch.Tensor) else v for k, v in b["counters"].items()})
            for b in state["branches"]}

    # ---------------------------------------------------------------- decisions
    def _info(self, step: int, role: str, branch: str) -> StepInfo:
        start = self.expert_start if role == self.role else step
        if self.schedule is None:
            return StepInfo(step, step - start, None, None, role, branch)
        return StepInfo(step, step - start, self.schedule.count(role), len(self.schedule), role, branch)

    def _state(self, role: str, branch: str) -> BranchState:
        return self.states.setdefault((role, branch), BranchState())

    def will_run(self, ahead: int, block: int) -> bool | None:
        """For the offload prefetcher: will `block` run `ahead` forwards from now (None: not decided yet)?"""
        n = self.num_blocks
        if n is None or block < self.front or block >= n - self.back:
            return True
        if ahead == 0 and self.decision is not None:
            return self.decision
        step = self.step + ahead
        if self.schedule is not None and step >= len(self.schedule):
            return True
        role = self.role if self.schedule is None else self.schedule[step]
        votes = []
        for branch in self.branches:
            same = role == self.role
            state = self.states.get((role, branch), BranchState()) if same else BranchState()
            # a branch computing its middle right now will have a residual to reuse by then
            reusable = bool(state.terms) or (same and branch in self.computing)
            votes.append(self.policy.forced(state, self._info(step, role, branch)) if reusable else True)
        if any(v is True for v in votes):
            return True
        return False if votes and all(v is False for v in votes) else None

    # ---------------------------------------------------------------- the cached forward
    def run(self, inner, role: str, blocks, x: torch.Tensor, inputs, start: int = 0,
            stop: int | None = None) -> torch.Tensor:
        """The cached forward of `role`'s blocks (a range request passes straight to the inner runner)."""
        if start != 0 or stop not in (None, len(blocks)):
            return inner(blocks, x, inputs, start, stop)
        rows = x.shape[0]
        if not self.begun or len(self.branches) != rows:
            self.begin(self.step + 1, role, tuple(f"row{r}" for r in range(rows)))
        self.begun = False
        n = self.num_blocks = len(blocks)
        front, middle_end = self.front, n - self.back
        states = [self._state(role, b) for b in self.branches]
        infos = [self._info(self.step, role, b) for b in self.branches]
        verdicts = [self.policy.forced(s, i) if s.terms and s.terms[0].shape == x.shape[1:] else True
                    for s, i in zip(states, infos)]

        signal = self.policy.needs_signal
        x_in = x if signal else None
        h = inner(blocks, x, inputs.keeping_input() if signal else inputs, 0, front)
        del x
        front_residual = (h - x_in) if signal else None
        del x_in
        compute = []
        for r, (state, info, verdict) in enumerate(zip(states, infos, verdicts)):
            if verdict is None:
                ref = state.front_ref
                # relative L1, accumulated in fp32 without an fp32 copy of the [L, d] tensors
                change = torch.stack([(front_residual[r] - ref).abs_().mean(dtype=torch.float32),
                                      ref.abs().mean(dtype=torch.float32)])
                if self.signal_mean is not None:
                    change = self.signal_mean(change)
                diff = change[0] / change[1].clamp_min(1e-12)
                verdict = self.policy.decide(state, info, float(diff))
            if verdict and signal:  # the reference is the front residual of the last computed step
                state.front_ref = front_residual[r].clone()  # a view would keep every row alive
            compute.append(verdict)
        del front_residual
        self.decision = any(compute)
        self.computing = {b for b, c in zip(self.branches, compute) if c}
        run_rows = [r for r in range(rows) if compute[r]]

        if run_rows:
            sub = len(run_rows) < rows
            index = torch.tensor(run_rows, device=h.device)
            h_in = h[index] if sub else h
            h_mid = inner(blocks, h_in, (inputs.rows(index) if sub else inputs).keeping_input(), front, middle_end)
            residual = h_mid - h_in
            for j, r in enumerate(run_rows):
                states[r].record(self.step, residual[j], self.policy.order)
            del residual, h_in
            if sub:
                h = h.clone()
                h[index] = h_mid
            else:
                h = h_mid
            del h_mid
        skipped = [r for r in range(rows) if not compute[r]]
        for r in skipped:  # h is this forward's own tensor here (the front output, or the clone above)
            h[r].add_(states[r].forecast(self.step))
        for state, info, computed in zip(states, infos, compute):
            self.policy.commit(state, info, computed)

        stats = self.stats
        stats.block_evals += rows * (front + n - middle_end) + len(run_rows) * (middle_end - front)
        stats.block_evals_total += rows * n
        stats.steps += rows
        stats.steps_cached += len(skipped)
        stats.forwards_without_middle += not run_rows
        return inner(blocks, h, inputs, middle_end, n)
