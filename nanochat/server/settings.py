"""What the server allows: per-request limits and server-wide settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from nanochat.errors import UserError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Anything outside gets a 400 naming the limit."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    temperature_range: tuple[float, float] = (0.0, 2.0)
    top_k_range: tuple[int, int] = (0, 200)        # 0 = no top-k filtering
    max_tokens_range: tuple[int, int] = (1, 4096)
    max_choices: int = 4                            # OpenAI `n`
    max_stop: int = 4                               # OpenAI allows up to 4 stop strings
    max_stop_chars: int = 64

    @property
    def max_body_bytes(self) -> int:
        # JSON may spend up to 6 bytes per character (\uXXXX escapes), plus structure
        return 6 * self.max_total_chars + 256 * self.max_messages + 65536


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "nanochat"
    limits: Limits = field(default_factory=Limits)
    temperature: float = 0.8          # defaults when a request does not say
    top_k: int = 50
    max_tokens: int = 512
    api_key: str | None = None        # when set, API endpoints need `Authorization: Bearer <key>`
    max_queue: int = 16               # requests allowed to wait for a busy replica
    shutdown_timeout: float = 10.0    # seconds to let in-flight generations finish on shutdown
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        lim = self.limits
        problems = [f"default {name}={value} is outside its allowed range {bounds}"
                    for name, value, bounds in (("temperature", self.temperature, lim.temperature_range),
                                                ("top_k", self.top_k, lim.top_k_range),
                                                ("max_tokens", self.max_tokens, lim.max_tokens_range))
                    if not bounds[0] <= value <= bounds[1]]
        if self.max_queue < 0:
            problems.append(f"max_queue must be 0 or more, got {self.max_queue}")
        if problems:
            raise UserError("server settings: " + "; ".join(problems))
