"""What a request costs: a versioned price table per model, in exact integer nano-dollars.

Prices are US dollars per million tokens, as Anthropic publishes them. A price with at most three
decimals (e.g. 0.075 $/MTok) times a whole number of tokens is a whole number of nano-dollars
(10^-9 USD), so every cost, total and cap is an exact integer: sums never drift, and a total
matches the upstream's usage to the cent (and beyond) however many requests it adds up.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aar_common.validation import describe

NANO_PER_USD = 10**9

# The table shipped with this version of aar; a configured table replaces entries by model.
# Source: anthropic.com/pricing. Long-context (over 200k input tokens) surcharges are not modelled.
BUILTIN_VERSION = "anthropic-2026-02"
_BUILTIN: dict[str, tuple[str, str, str, str, str]] = {
    # model: input, output, cache write (5 min), cache write (1 h), cache read
    "claude-opus-4-6": ("5", "25", "6.25", "10", "0.50"),
    "claude-opus-4-5": ("5", "25", "6.25", "10", "0.50"),
    "claude-opus-4-1": ("15", "75", "18.75", "30", "1.50"),
    "claude-opus-4-0": ("15", "75", "18.75", "30", "1.50"),
    "claude-opus-4": ("15", "75", "18.75", "30", "1.50"),
    "claude-sonnet-4-5": ("3", "15", "3.75", "6", "0.30"),
    "claude-sonnet-4-0": ("3", "15", "3.75", "6", "0.30"),
    "claude-sonnet-4": ("3", "15", "3.75", "6", "0.30"),
    "claude-3-7-sonnet": ("3", "15", "3.75", "6", "0.30"),
    "claude-haiku-4-5": ("1", "5", "1.25", "2", "0.10"),
    "claude-3-5-haiku": ("0.80", "4", "1", "1.6", "0.08"),
    "claude-3-haiku": ("0.25", "1.25", "0.30", "0.50", "0.03"),
}

# Dated snapshots and `-latest` names priced as the model they name, each listed: a name is priced
# only when the table lists it or an alias names it, never by stripping a date off it (a later
# snapshot may be priced differently, and billing it at its family's price would be a guess).
_BUILTIN_ALIASES = {
    "claude-opus-4-5-20251101": "claude-opus-4-5",
    "claude-opus-4-1-20250805": "claude-opus-4-1",
    "claude-opus-4-20250514": "claude-opus-4",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5",
    "claude-sonnet-4-20250514": "claude-sonnet-4",
    "claude-3-7-sonnet-20250219": "claude-3-7-sonnet",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet",
    "claude-haiku-4-5-20251001": "claude-haiku-4-5",
    "claude-3-5-haiku-20241022": "claude-3-5-haiku",
    "claude-3-5-haiku-latest": "claude-3-5-haiku",
    "claude-3-haiku-20240307": "claude-3-haiku",
}


class PricingError(ValueError):
    """A price table that cannot be used, or a model it does not price; the message says how to
    fix it."""


class Price(BaseModel):
    """US dollars per million tokens of each kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0, description="uncached input tokens")
    output: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0, description="cache writes with the default 5 minute TTL")
    cache_write_1h: Decimal | None = Field(
        default=None, ge=0, description="cache writes with a 1 hour TTL; default 2x input"
    )
    cache_read: Decimal = Field(ge=0)

    @field_validator("*", mode="after")
    @classmethod
    def _at_most_three_decimals(cls, value: Decimal | None) -> Decimal | None:
        # Three decimals of $/MTok is what keeps every cost a whole number of nano-dollars.
        if value is not None and value != value.quantize(Decimal("0.001")):
            raise ValueError(
                f"prices have at most 3 decimals in $ per million tokens (got {value})"
            )
        return value

    def nano_per_token(self) -> tuple[int, int, int, int, int]:
        """Nano-dollars per token: input, output, cache write 5 min, cache write 1 h, read."""
        write_1h = self.cache_write_1h if self.cache_write_1h is not None else 2 * self.input
        return (
            int(self.input * 1000),
            int(self.output * 1000),
            int(self.cache_write * 1000),
            int(write_1h * 1000),
            int(self.cache_read * 1000),
        )

    def worst_case_nano(self, input_tokens: int, output_tokens: int) -> int:
        """The most a request with at most these counts can cost: every input token at the
        dearest rate the API may bill it at (uncached, a cache write of either TTL, or a read)."""
        rate_in, rate_out, rate_write, rate_write_1h, rate_read = self.nano_per_token()
        dearest = max(rate_in, rate_write, rate_write_1h, rate_read)
        return input_tokens * dearest + output_tokens * rate_out


# The counts the Messages API reports at the top level of `usage` (`cache_creation`, a breakdown
# of the cache writes by TTL, is the one nested field).
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class Usage(BaseModel):
    """Token counts as the Messages API reports them in `usage`."""

    model_config = ConfigDict(extra="ignore")

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The API splits cache writes by TTL here when 1 h caching is used; absent otherwise.
    cache_creation_1h_input_tokens: int = 0

    @classmethod
    def from_api(cls, usage: dict[str, Any]) -> Usage:
        """Read an API `usage` object (its null fields count as 0)."""
        counts = {key: value for key, value in usage.items() if isinstance(value, int)}
        breakdown = usage.get("cache_creation")
        if isinstance(breakdown, dict):
            one_hour = breakdown.get("ephemeral_1h_input_tokens")
            if isinstance(one_hour, int):
                counts["cache_creation_1h_input_tokens"] = one_hour
        return cls.model_validate(counts)

    @property
    def billable(self) -> bool:
        return any(
            (
                self.input_tokens,
                self.output_tokens,
                self.cache_creation_input_tokens,
                self.cache_read_input_tokens,
            )
        )


class PriceTable(BaseModel):
    """Prices by model, with the version that every ledger row records it was priced by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    models: dict[str, Price] = Field(default_factory=dict)
    # Other names of listed models (a dated snapshot, a `-latest` name): priced as the model.
    aliases: dict[str, str] = Field(default_factory=dict)
    # Unknown models are refused unless a default price is configured: never billed at 0.
    default: Price | None = None

    def price(self, model: str) -> Price:
        """The price of `model`, or a PricingError that says how to add one."""
        name = self.aliases.get(model, model)
        if name in self.models:
            return self.models[name]
        if self.default is not None:
            return self.default
        raise PricingError(
            f"model {model!r} has no price at this gateway (price table {self.version}), so its "
            "use cannot be metered; use a priced model or ask the fleet's operator to add it "
            "under gateway.prices.models in the chart values (a dated snapshot of a priced "
            f"model too: it is priced only when listed, or named in the table's aliases as "
            f"{{{model!r}: <priced model>}})"
        )

    def unknown_aliases(self) -> list[str]:
        """Aliases that name no model of the table, as `alias -> model`."""
        return [f"{a} -> {m}" for a, m in sorted(self.aliases.items()) if m not in self.models]

    def cost_nano(self, model: str, usage: Usage) -> int:
        """The cost of `usage` on `model`, in nano-dollars."""
        rate_in, rate_out, rate_write, rate_write_1h, rate_read = self.price(model).nano_per_token()
        one_hour = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
        return (
            usage.input_tokens * rate_in
            + usage.output_tokens * rate_out
            + (usage.cache_creation_input_tokens - one_hour) * rate_write
            + one_hour * rate_write_1h
            + usage.cache_read_input_tokens * rate_read
        )


def builtin_table() -> PriceTable:
    return PriceTable(
        version=BUILTIN_VERSION,
        models={
            model: Price(
                input=Decimal(i),
                output=Decimal(o),
                cache_write=Decimal(w),
                cache_write_1h=Decimal(w1),
                cache_read=Decimal(r),
            )
            for model, (i, o, w, w1, r) in _BUILTIN.items()
        },
        aliases=_BUILTIN_ALIASES,
    )


def load_table(path: Path | None) -> PriceTable:
    """The built-in table, with a configured YAML/JSON file's models and default laid over it.

    The file names its own `version` (required): ledger rows record which table priced them.
    Its `aliases` (`{name: priced model}`) add to the built-in ones.
    """
    table = builtin_table()
    if path is None:
        return table
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PricingError(f"cannot read the price table {path}: {error}") from error
    if not isinstance(raw, dict) or not raw.get("version"):
        raise PricingError(
            f"price table {path} must be a mapping with a 'version' (e.g. 'ours-2026-03') and "
            "'models: {model: {input, output, cache_write, cache_read}}' in $ per million tokens"
        )
    try:
        override = PriceTable.model_validate(raw)
    except ValidationError as error:
        problems = describe(error, whole="top level")
        raise PricingError(f"price table {path} is invalid: {problems}") from error
    merged = PriceTable(
        version=override.version,
        models={**table.models, **override.models},
        aliases={**table.aliases, **override.aliases},
        default=override.default,
    )
    if unknown := merged.unknown_aliases():
        raise PricingError(
            f"price table {path}: aliases must name a model the table prices: {', '.join(unknown)}"
        )
    return merged


def nano_to_usd(nano: int) -> Decimal:
    """Exact dollars from nano-dollars."""
    return Decimal(nano).scaleb(-9)


def usd_text(nano: int) -> str:
    """Dollars as an exact decimal string with nine places, never in exponent form."""
    return format(nano_to_usd(nano), "f")


def usd_to_nano(usd: Decimal | float | str) -> int:
    """Nano-dollars from dollars; floats go through their shortest decimal form (0.1 -> 0.1)."""
    return int((Decimal(str(usd)) * NANO_PER_USD).to_integral_value())
