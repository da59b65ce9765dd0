"""Training curricula: phases of resolution, frame count, batch size and step budget."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    resolution: int
    frames: int
    batch_size: int
    steps: int


class Curriculum:
    """An ordered list of phases; the last phase continues past its budget if training does."""

    def __init__(self, phases: list[dict | Phase]):
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        if not self.phases:
            raise ValueError("curriculum: needs at least one phase")
        for i, p in enumerate(self.phases):
            for key in ("resolution", "frames", "batch_size", "steps"):
                if getattr(p, key) <= 0:
                    raise ValueError(f"curriculum[{i}].{key}: must be positive, got {getattr(p, key)}")

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def index_at(self, step: int) -> int:
        """Index of the phase that optimizer step `step` (0-based) belongs to."""
        end = 0
        for i, p in enumerate(self.phases):
            end += p.steps
            if step < end:
                return i
        return len(self.phases) - 1

    def at(self, step: int) -> Phase:
        return self.phases[self.index_at(step)]
