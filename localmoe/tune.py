"""`localmoe tune`: time a short decode at a few expert cache settings on the user's own machine, and
say which flags were fastest.

One knob at a time, from the planned slot count: the policy, then what a miss does, then, for a miss
policy that decides on the host, prefetch depth and its margin, then pinning the prompt's hottest
experts, each candidate timed several times (interleaved, the median kept). Then the best setting at a
half and three quarters of the slots, to show what a smaller budget would cost. Every setting runs on
the same loaded model: the cache is emptied between tries and resized within the pool allocated at
load, so nothing is reloaded and the memory plan never changes. The candidates are the registries'
entries.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from localmoe.bench import RunResult, run_engine
from localmoe.engine import Engine
from localmoe.runtime.expert_cache import POLICIES
from localmoe.runtime.miss_policy import MISS_POLICIES

PREFETCH_DEPTHS, PREFETCH_MARGINS = (0, 1, 2), (0, 2)


@dataclass(frozen=True)
class Setting:
    policy: str
    prefetch: int
    prefetch_margin: int
    pin_hot: int
    miss_policy: str
    slots: int = 0  # 0: the plan's

    def flags(self) -> str:
        return (
            f"--policy {self.policy} --prefetch {self.prefetch} --prefetch-margin {self.prefetch_margin} "
            f"--pin-hot {self.pin_hot} --miss-policy {self.miss_policy}"
        )


@dataclass(frozen=True)
class Timing:
    """A setting's decode tokens/s over its runs, and the hit rate of the last."""

    rates: tuple[float, ...]
    hit_rate: float

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


class Tuner:
    """Times settings on a loaded engine: each knob's candidates run `repeats` times, interleaved (one
    run of each, then again), so that a load that comes and goes on the machine falls on all of them; a
    candidate's speed is its median."""

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        tokens: int,
        report: Callable[[Setting, Timing], None],
        repeats: int = 3,
    ):
        self.engine, self.prompt, self.tokens, self.report, self.repeats = engine, prompt, tokens, report, repeats
        self.timings: dict[Setting, Timing] = {}

    def run(self) -> Setting:
        """The fastest setting found (its timing in `timings`)."""
        plan, options, miss = self.engine.plan, self.engine.options, self.engine.miss_policy
        hot = max(0, (plan.slots - plan.footprint.top_k) // 4)
        start = Setting(options.policy, MISS_POLICIES[miss].prefetch, options.prefetch_margin, 0, miss)
        best = self.fastest([replace(start, policy=policy) for policy in POLICIES])
        misses = [replace(best, miss_policy=name, prefetch=kind.prefetch) for name, kind in MISS_POLICIES.items()]
        best = self.fastest([setting for setting in misses if self.engine.can_use(setting.miss_policy)])
        if not MISS_POLICIES[best.miss_policy].in_place:
            best = self.fastest([replace(best, prefetch=depth) for depth in PREFETCH_DEPTHS])
            if best.prefetch:
                best = self.fastest([replace(best, prefetch_margin=margin) for margin in PREFETCH_MARGINS])
        best = self.fastest([replace(best, pin_hot=count) for count in sorted({0, hot})])
        planned, least = plan.slots, plan.footprint.top_k + best.pin_hot
        smaller = [replace(best, slots=slots) for slots in sorted({planned // 2, planned * 3 // 4} - {planned})]
        self.time([setting for setting in smaller if setting.slots >= least])
        return best

    def fastest(self, candidates: list[Setting]) -> Setting:
        self.time(candidates)
        return max(candidates, key=lambda setting: self.timings[setting].median)

    def time(self, settings: list[Setting]) -> None:
        """Run each setting `repeats` times, round by round, and report each."""
        runs: dict[Setting, list[RunResult]] = {setting: [] for setting in settings}
        for _ in range(self.repeats):
            for setting in settings:
                runs[setting].append(self._run(setting))
        for setting, results in runs.items():
            earlier = self.timings[setting].rates if setting in self.timings else ()
            rates = earlier + tuple(result.decode_tokens_per_s for result in results)
            self.timings[setting] = Timing(rates, results[-1].hit_rate or 0.0)
            self.report(setting, self.timings[setting])

    def _run(self, setting: Setting) -> RunResult:
        self.engine.reconfigure(
            slots=setting.slots or self.engine.plan.slots,
            policy=setting.policy,
            prefetch=setting.prefetch,
            prefetch_margin=setting.prefetch_margin,
            pin_hot=setting.pin_hot,
            miss_policy=setting.miss_policy,
        )
        return run_engine(self.engine, setting.flags(), self.prompt, self.tokens)
