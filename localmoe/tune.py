"""`localmoe tune`: time a short decode at a few expert cache settings on the user's own machine, and
say which flags were fastest.

One knob at a time, from the planned slot count: the policy, then prefetch depth, then its margin,
then pinning the prompt's hottest experts, then what a miss does. Then the best setting at a half and
three quarters of the slots, to show what a smaller budget would cost. Every setting runs on the same
loaded model: the cache is emptied between tries and resized within the pool allocated at load, so
nothing is reloaded and the memory plan never changes.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from localmoe.bench import RunResult, run_engine
from localmoe.engine import Engine


@dataclass(frozen=True)
class Setting:
    policy: str = "score"
    prefetch: int = 1
    prefetch_margin: int = 0
    pin_hot: int = 0
    miss_policy: str = "copy"
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
        hot = max(0, (self.engine.plan.slots - self.engine.plan.footprint.top_k) // 4)
        start = Setting(miss_policy=self.engine.experts.miss_policy)
        best = max((replace(start, policy=policy) for policy in ("score", "lfu", "lru")), key=self.rate)
        best = max((replace(best, prefetch=depth) for depth in (0, 1, 2)), key=self.rate)
        if best.prefetch:
            best = max((replace(best, prefetch_margin=margin) for margin in (0, 2)), key=self.rate)
        best = max((replace(best, pin_hot=count) for count in {0, hot}), key=self.rate)
        # auto needs the bandwidths measured at load, which a model loaded with another policy lacks
        misses = ("copy", "cpu", "bypass", "auto") if self.engine.experts.bandwidths else ("copy", "cpu", "bypass")
        best = max((replace(best, miss_policy=miss) for miss in misses), key=self.rate)
        planned, least = self.engine.plan.slots, self.engine.plan.footprint.top_k + best.pin_hot
        for slots in sorted({planned // 2, planned * 3 // 4} - {planned}):
            if slots >= least:
                self.rate(replace(best, slots=slots))
        return best

    def rate(self, setting: Setting) -> float:
        """Decode tokens/s of one setting, measured once."""
        if setting not in self.rates:
            experts = self.engine.experts
            experts.cache.clear(setting.policy)
            self.engine.resize_cache(setting.slots or self.engine.plan.slots)
            experts.configure_prefetch(setting.prefetch, setting.prefetch_margin)
            experts.miss_policy = setting.miss_policy
            self.engine.options.pin_hot = setting.pin_hot
            result = run_engine(self.engine, setting.flags(), self.prompt, self.tokens)
            self.rates[setting] = result.decode_tokens_per_s
            self.report(setting, result)
        return self.rates[setting]
