"""The customer's license as the app is configured with it (``AppConfig.license``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class LicenseConfig(BaseModel):
    """The customer's license: checked at start, counted and reported by the license actor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SecretStr = Field(description="The license key the vendor sent (MTL1....).")
    ledger_path: str = Field(description="Usage ledger (SQLite) on the head node.")
    report_interval_s: float = Field(60.0, gt=0, description="How often usage is reported.")
    max_instances: int | None = Field(
        None, ge=1, description="The customer's own cap on LLM replicas (caps autoscaling)."
    )
    actor_name: str = Field("serve_app_license", description="Name of the singleton actor.")
    namespace: str = Field("serve_app", description="Ray namespace of the singleton actor.")
