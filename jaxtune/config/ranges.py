"""Declared ranges of the config's numeric fields: each field's type says which values mean something.

A field typed `Positive` (an int >= 1), `Fraction` (a float in [0, 1)) and so on is checked when its section is
built, with one error line naming the key and the range; `declared(cls)` lists them (tests draw values from it).
A float must be finite as well: nan and inf mean nothing in any field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any

from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= value <= hi (either bound open or absent), or one of `also`, whose meaning `note` gives."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  also: tuple[Any, ...] = ()
  note: str = ""

  def holds(self, value: Any) -> bool:
    if value in self.also:
      return True
    if isinstance(value, float) and not math.isfinite(value):
      return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

  def text(self) -> str:
    """'must be >= 1', 'must be in [0, 1)', ... as the error line says it."""
    if self.lo is not None and self.hi is not None:
      span = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
    elif self.lo is not None:
      span = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
    elif self.hi is not None:
      span = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
    else:
      span = "finite"
    also = " or ".join(f"{v!r}" for v in self.also)
    return f"must be {f'{also} or ' if also else ''}{span}{f' ({self.note})' if self.note else ''}"


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


Positive = Annotated[int, Range(lo=1)]  # a count where zero or fewer means nothing
NonNegative = Annotated[int, Range(lo=0)]  # a count whose 0 has a documented meaning (off, "at each eval", ...)
PositiveFloat = Annotated[float, Range(lo=0, lo_open=True)]
NonNegativeFloat = Annotated[float, Range(lo=0)]
Finite = Annotated[float, Range()]
Fraction = Annotated[float, Range(lo=0, hi=1, hi_open=True)]  # a probability of dropping (dropout)
Mass = Annotated[float, Range(lo=0, hi=1, lo_open=True)]  # a share of probability mass (top-p)
Decay = Annotated[float, Range(lo=0, hi=1, hi_open=True)]  # a moving average's decay per step (Adam's b1, b2)
Seed = Annotated[int, Range(lo=0, hi=2**32 - 1)]  # numpy's and JAX's seeds are unsigned 32-bit
MeshSize = Annotated[int, Range(lo=1, also=(-1,), note="-1 fills the devices the other axes leave")]


def declared(cls: type) -> dict[str, Range]:
  """field name -> declared Range of a config section (fields typed with the aliases above, optional or not)."""
  found = {}
  for name, hint in typing.get_type_hints(cls, include_extras=True).items():
    for arg in (hint, *typing.get_args(hint)):  # `Positive | None`, `tuple[Positive, ...]` hold the Annotated
      if typing.get_origin(arg) is Annotated:
        found[name] = next(m for m in arg.__metadata__ if isinstance(m, Range))
  return found


def section(key: str) -> Any:
  """Class decorator: a frozen dataclass for config section `key` (e.g. 'model.lora') whose fields are checked
  against their declared ranges before its own __post_init__ runs."""

  def wrap(cls: type) -> type:
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self: Any) -> None:
      for name, bounds in declared(type(self)).items():
        values = getattr(self, name)
        for value in values if isinstance(values, tuple) else (values,):  # a tuple's range is its items'
          if value is not None and not bounds.holds(value):
            finite = "" if not isinstance(value, float) or math.isfinite(value) else ", and finite"
            raise UserError(f"config key {key}{'.' if key else ''}{name} holds {value!r}; it {bounds.text()}{finite}."
                            if values is not value else
                            f"config key {key}{'.' if key else ''}{name} is {value!r}; it {bounds.text()}{finite}.")
      if own is not None:
        own(self)

    cls.__post_init__ = __post_init__
    cls.SECTION = key
    return dataclasses.dataclass(frozen=True)(cls)

  return wrap
