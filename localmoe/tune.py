"""`localmoe tune`: time a short decode at a few expert cache settings on the user's own machine, and
say which flags were fastest.

One knob at a time, from the planned slot count: the policy, then what a miss does, then, for a miss
policy that decides on the host, prefetch depth and its margin, then pinning the prompt's hottest
experts. Then the best setting at a half and three quarters of the slots, to show what a smaller
budget would cost. Every setting runs on the same loaded model: the cache is emptied between tries and
resized within the pool allocated at load, so nothing is reloaded and the memory plan never changes.
The candidates are the registries' entries.
"""

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


class Tuner:
    def __init__(self, engine: Engine, prompt: list[int], tokens: int, report: Callable[[Setting, RunResult], None]):
        self.engine, self.prompt, self.tokens, self.report = engine, prompt, tokens, report
        self.rates: dict[Setting, float] = {}

    def run(self) -> Setting:
        """The fastest setting found (its decode tokens/s in `rates`)."""
        plan, options, miss = self.engine.plan, self.engine.options, self.engine.miss_policy
        hot = max(0, (plan.slots - plan.footprint.top_k) // 4)
        start = Setting(options.policy, MISS_POLICIES[miss].prefetch, options.prefetch_margin, 0, miss)
        best = max((replace(start, policy=policy) for policy in POLICIES), key=self.rate)
        misses = [replace(best, miss_policy=name, prefetch=kind.prefetch) for name, kind in MISS_POLICIES.items()]
        best = max((setting for setting in misses if self.engine.can_use(setting.miss_policy)), key=self.rate)
        if not MISS_POLICIES[best.miss_policy].in_place:
            best = max((replace(best, prefetch=depth) for depth in PREFETCH_DEPTHS), key=self.rate)
            if best.prefetch:
                best = max((replace(best, prefetch_margin=margin) for margin in PREFETCH_MARGINS), key=self.rate)
        best = max((replace(best, pin_hot=count) for count in {0, hot}), key=self.rate)
        planned, least = plan.slots, plan.footprint.top_k + best.pin_hot
        for slots in sorted({planned // 2, planned * 3 // 4} - {planned}):
            if slots >= least:
                self.rate(replace(best, slots=slots))
        return best

    def rate(self, setting: Setting) -> float:
        """Decode tokens/s of one setting, measured once."""
        if setting not in self.rates:
            self.engine.reconfigure(
                slots=setting.slots or self.engine.plan.slots,
                policy=setting.policy,
                prefetch=setting.prefetch,
                prefetch_margin=setting.prefetch_margin,
                pin_hot=setting.pin_hot,
                miss_policy=setting.miss_policy,
            )
            result = run_engine(self.engine, setting.flags(), self.prompt, self.tokens)
            self.rates[setting] = result.decode_tokens_per_s
            self.report(setting, result)
        return self.rates[setting]
