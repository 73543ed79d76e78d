"""The local server's request bodies, as pydantic models: what each mutating route accepts.

The endpoint wrapper (:func:`agent.server.app.endpoint`) validates a route's body with its
model before the handler runs, and the OpenAPI document (:mod:`.openapi`) takes each route's
request schema from the same model, so the two cannot disagree. Models are strict (``"1"``
is not a size, ``1`` is not a string), ignore unknown fields (the contract lets a client
send more) and read null as absent.

Rules a type cannot say (a component name's path rules, no name twice, no name that is a
directory of another, a key only with a run) are validators here too; they raise the
contract's ``invalid_request`` with the same wording the handlers always used.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent import validation

from .http import invalid
from .storage import MAX_OBJECT_BYTES, MAX_PARTS

Visibility = Literal["private", "organization", "team", "public"]
Action = Literal["read", "write", "delete", "administer"]
RunStatus = Literal["finished", "failed", "crashed"]
AssetState = Literal["pending", "ready", "abandoned"]
VISIBILITIES: tuple[str, ...] = get_args(Visibility)
ACTIONS: tuple[str, ...] = get_args(Action)
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
STATES: tuple[str, ...] = get_args(AssetState)

MAX_COMPONENTS = 100_000
MAX_NAME_BYTES = 900
"""S3 keys are at most 1024 bytes; ours are ``assets/<asset_id>/<name>``."""
MAX_SEGMENT_BYTES = 255
"""A file name's limit on every common file system (a store with a filer maps keys to files)."""
MAX_ASSET_TYPE = 128
"""Characters; the contract sets no alphabet, so only control characters are refused."""
MAX_ASSET_KEY = 256
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
RUN_ID = re.compile(r"[^\s/\\?#%\x00-\x1f]{1,256}")
NO_CONTROL = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
"""No C0 or C1 control character (what :func:`is_control` refuses), as a JSON Schema pattern."""


def whole(pattern: re.Pattern[str]) -> str:
    """``pattern`` as a JSON Schema pattern that must match the whole string."""
    return f"^(?:{pattern.pattern})$"


def is_control(ch: str) -> bool:
    return ch < " " or "\x7f" <= ch <= "\x9f"


def _rule(phrase: str) -> PydanticCustomError:
    """A refusal worded as a phrase about the field (``must be 64 hex digits``)."""
    return PydanticCustomError("custom", phrase)  # no context: the phrase is not formatted


# ---- component names ---------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable component name (a relative POSIX path), or None."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains NUL"
    if name.startswith("/"):
        return "is absolute"
    segments = name.split("/")
    if "" in segments:
        return "has an empty path segment"
    if ".." in segments:
        return "contains '..'"
    if "." in segments:
        return "contains a '.' segment"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    control = next((ch for ch in name if is_control(ch)), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}"
    if any(len(seg.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES for seg in segments):
        return f"has a path segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def clash(names: list[str]) -> tuple[str, str] | None:
    """Two names of one asset where one is a directory of the other (``a`` and ``a/b``):
    no file system (nor an S3 store with a filer) holds both. The pair, or None."""
    files = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                return prefix, name
    return None


def check_name(name: str, where: str) -> None:
    problem = name_problem(name)
    if problem:
        raise invalid(
            f"{where}: component name {name!r} {problem} (names are relative POSIX paths)"
        )


# ---- field types -------------------------------------------------------------------------------


def _sha256(value: str) -> str:
    if not SHA256.fullmatch(value):
        raise _rule("must be 64 hex digits")
    return value.lower()


def _no_control(value: str) -> str:
    control = next((ch for ch in value if is_control(ch)), None)
    if control is not None:
        raise _rule(f"contains the control character U+{ord(control):04X}")
    return value


def _asset_key(value: str) -> str:
    if not value or len(value) > MAX_ASSET_KEY or not value.isprintable():
        raise _rule(f"must be 1 to {MAX_ASSET_KEY} printable characters")
    return value


def _run_id(value: str) -> str:
    if value and not RUN_ID.fullmatch(value):
        raise _rule(f"{value!r} is not usable: 1-256 characters, no whitespace, '/', '\\', "
                    "'?', '#', '%' or control characters")
    return value


NonEmpty = Annotated[str, Field(min_length=1)]
Size = Annotated[int, Field(ge=0, le=MAX_OBJECT_BYTES, description="bytes")]
Sha256 = Annotated[str, AfterValidator(_sha256),
                   Field(json_schema_extra={"pattern": whole(SHA256)})]
PartNumber = Annotated[int, Field(ge=1, le=MAX_PARTS)]
AssetType = Annotated[str, Field(min_length=1, max_length=MAX_ASSET_TYPE,
                                 json_schema_extra={"pattern": NO_CONTROL}),
                      AfterValidator(_no_control)]
AssetKey = Annotated[str, AfterValidator(_asset_key),
                     Field(json_schema_extra={"minLength": 1, "maxLength": MAX_ASSET_KEY,
                                              "pattern": NO_CONTROL})]
RunId = Annotated[str, AfterValidator(_run_id),
                  Field(json_schema_extra={"pattern": f"^$|{whole(RUN_ID)}"},
                        description="empty or absent: the server picks one")]
ComponentName = Annotated[str, Field(
    min_length=1, json_schema_extra={"pattern": NO_CONTROL},
    description="a relative POSIX path: no leading '/', no empty, '.' or '..' segment, "
                f"no control character, at most {MAX_NAME_BYTES} bytes of UTF-8 and "
                f"{MAX_SEGMENT_BYTES} per segment; in one asset no name is a directory of "
                "another ('a' beside 'a/b')")]


class Body(BaseModel):
    """A request body: strict, unknown fields ignored, immutable."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


B = TypeVar("B", bound=Body)


class ComponentSpec(Body):
    """A component as declared: its name, and what the uploader knows of it."""

    name: ComponentName
    size: Size | None = None
    content_type: str | None = None
    sha256: Sha256 | None = None


def _named(value: Any) -> Any:
    """A bare name stands for ``{"name": name}``."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


def _distinct(specs: list[ComponentSpec]) -> list[ComponentSpec]:
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        check_name(spec.name, f"components[{i}]")
        if spec.name in seen:
            raise invalid(f"components[{i}]: component {spec.name!r} is listed twice")
        seen.add(spec.name)
    both = clash([s.name for s in specs])
    if both:
        raise invalid(
            f"components: component {both[1]!r} needs {both[0]!r} to be a directory, but "
            f"{both[0]!r} is also a component (a name cannot be both a file and a directory)"
        )
    return specs


Components = Annotated[
    list[ComponentSpec],
    BeforeValidator(_named, json_schema_input_type=list[ComponentName | ComponentSpec]),
    Field(min_length=1, max_length=MAX_COMPONENTS, description="each name at most once"),
    AfterValidator(_distinct),
]


class Placement(Body):
    visibility: Visibility | None = None
    organization_id: str | None = None


# ---- assets ------------------------------------------------------------------------------------


class Register(Placement):
    asset_type: AssetType
    components: Components
    output_of: str | None = None
    content_type: str | None = None
    key: AssetKey | None = Field(default=None, description=(
        "API 1.1 asset_keys: a later registration with the same run, type and key joins "
        "the pending asset; needs output_of"))

    @model_validator(mode="after")
    def _key_needs_a_run(self) -> Register:
        if self.key is not None and not self.output_of:
            raise invalid("key needs output_of: uploaders join an asset by run, type and key")
        return self


def _not_null(value: Any) -> Any:
    if value is None:
        raise _rule("is required (a JSON value or a string)")
    return value


class Inline(Placement):
    asset_type: AssetType
    content: Annotated[Any, AfterValidator(_not_null), Field(json_schema_extra={
        "not": {"type": "null"}}, description="a string (text/plain) or any other JSON value")]
    content_type: str | None = None
    output_of: str | None = None


class RefreshUrls(Body):
    components: Annotated[Components | None, BeforeValidator(lambda v: v or None)] = Field(
        default=None, description="only these components (a declared size plans or re-plans "
                                  "one); absent or empty: every component")
    parts: dict[str, list[PartNumber]] | None = Field(
        default=None, description="only these parts of a multipart component")


class AddComponents(Body):
    components: Components


class PartClaim(Body):
    part_number: PartNumber
    etag: NonEmpty


def _ascending(parts: list[PartClaim]) -> list[PartClaim]:
    numbers = [p.part_number for p in parts]
    if numbers != sorted(set(numbers)):
        raise _rule("must be in ascending part_number order, no repeats")
    return parts


class FinalizeSpec(Body):
    """What the uploader says of one component at finalize."""

    size: Size | None = None
    sha256: Sha256 | None = None
    content_type: str | None = None
    parts: Annotated[list[PartClaim], AfterValidator(_ascending)] | None = None


class Finalize(Body):
    components: dict[str, FinalizeSpec | None] | None = None

    def specs(self) -> dict[str, FinalizeSpec]:
        return {name: spec or FinalizeSpec() for name, spec in (self.components or {}).items()}


class Reason(Body):
    reason: str | None = None


# ---- runs, experiments, variations ---------------------------------------------------------------


class RunCreate(Body):
    run_id: RunId | None = None
    name: str | None = None


class RunEnd(Body):
    status: RunStatus | None = None


class Named(Body):
    name: NonEmpty


class VariationCreate(Body):
    name: NonEmpty
    inputs: list[NonEmpty] | None = Field(default=None, description="input asset ids")
    allow_invalid_assets: bool = False


class OutputLink(Body):
    asset_id: NonEmpty


# ---- sharing -----------------------------------------------------------------------------------


class GrantAccess(Body):
    principal_id: NonEmpty
    action: Action


class Share(Body):
    scope_id: NonEmpty


class SetVisibility(Body):
    visibility: Visibility


class Move(Body):
    organization_id: NonEmpty
    visibility: Visibility | None = None


def parse(model: type[B], raw: dict[str, Any]) -> B:
    """``raw`` as a ``model``; a refusal is the contract's ``invalid_request``, naming the
    field and what is wrong with it."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise invalid(validation.message(e)) from None
