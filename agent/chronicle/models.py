"""Request and response models of the Chronicle asset API, version 1.

Models accept unknown fields (``extra="allow"``) so that a newer Chronicle that adds fields
does not break the agent; they validate what the agent relies on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AssetState = Literal["pending", "ready", "abandoned"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Flag(_Model):
    reason: str
    at: str | None = None


class Component(_Model):
    name: str
    size: int | None = None
    sha256: str | None = None
    content_type: str | None = None
    uploaded: bool = False


class Asset(_Model):
    asset_id: str
    asset_type: str
    state: AssetState
    deprecated: Flag | None = None
    invalidated: Flag | None = None
    output_of: str | None = None
    created_by: str | None = None
    organization_id: str | None = None
    visibility: str = "private"
    content_type: str | None = None
    components: list[Component] = Field(default_factory=list)
    created_at: str | None = None
    finalized_at: str | None = None
    download_urls: dict[str, str] | None = None
    warnings: list[Any] | None = None
    abandoned_reason: str | None = None
    """Why an ``abandoned`` asset was abandoned (a run's end, a cancel, ``expired``)."""


class AssetList(_Model):
    assets: list[Asset]


class SearchHit(Asset):
    """An asset found by search (API 1.1), with where it matched."""

    snippet: str = ""
    """The matching words in context, each in [brackets]."""
    text: str = ""
    """The first line of an inline asset's text ("" for the others)."""


class SearchPage(_Model):
    assets: list[SearchHit]
    next_cursor: str | None = None


class Run(_Model):
    run_id: str
    name: str | None = None
    status: str | None = None


class PartUrl(_Model):
    part_number: int
    url: str


class MultipartPlan(_Model):
    part_size: int
    parts: list[PartUrl]
    upload_id: str | None = None


class UploadUrls(_Model):
    asset_id: str
    expires_at: str | None = None
    upload_urls: dict[str, str] = Field(default_factory=dict)
    multipart: dict[str, MultipartPlan] = Field(default_factory=dict)
    upload_headers: dict[str, dict[str, str]] = Field(default_factory=dict)
    """API 1.1 ``checksum_urls``: headers a single URL must be sent with, exactly."""


class StoredPart(_Model):
    part_number: int
    etag: str
    size: int | None = None


class StoredComponent(_Model):
    uploaded: bool = False
    parts: list[StoredPart] = Field(default_factory=list)


class Uploads(_Model):
    components: dict[str, StoredComponent] = Field(default_factory=dict)


class Grant(_Model):
    principal_id: str
    action: str


class Grants(_Model):
    grants: list[Grant]


class Scope(_Model):
    id: str
    kind: str
    name: str | None = None


class Scopes(_Model):
    principal_id: str
    scopes: list[Scope] = Field(default_factory=list)


class Experiment(_Model):
    experiment_id: str
    name: str | None = None
    created_by: str | None = None
    retracted: Flag | None = None
    invalidated: list[str] | None = None
    """Only in a retract answer: the outputs it invalidated."""


class Variation(_Model):
    variation_id: str
    experiment_id: str | None = None
    name: str | None = None
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    warnings: list[Any] | None = None
    """Only in a create answer: e.g. deprecated inputs, with their reasons."""


# ---- request pieces --------------------------------------------------------------------


class ComponentDecl(BaseModel):
    name: str
    size: int | None = None
    content_type: str | None = None
    sha256: str | None = None
    """Declared for a checksum-bound URL (API 1.1 ``checksum_urls``)."""

    def wire(self) -> dict[str, Any] | str:
        if self.size is None and self.content_type is None and self.sha256 is None:
            return self.name
        return self.model_dump(exclude_none=True)


class FinalizeComponent(BaseModel):
    size: int
    sha256: str
    content_type: str | None = None
    parts: list[dict[str, Any]] | None = None
