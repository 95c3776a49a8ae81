"""A `jax.profiler` trace of chosen training steps (`train.profile_steps`)."""
import dataclasses

import jax

from gptlab.errors import UserError


@dataclasses.dataclass
class StepProfiler:
    """Writes a `jax.profiler` trace of steps [first, last] into `directory` (TensorBoard / Perfetto).

    `train.profile_steps=(first, last)` turns it on; () leaves it off.
    """
    steps: tuple
    directory: str
    log: object = print
    active: bool = False

    def __post_init__(self):
        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise UserError(f"train.profile_steps={tuple(self.steps)} must be (first, last) steps with "
                            "1 <= first <= last, e.g. (10, 12); () for no trace")

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.steps[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if not self.active:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.steps[0]}-{self.steps[1]} written to {self.directory} "
                 "(tensorboard --logdir, or ui.perfetto.dev with its .trace.json.gz)")
