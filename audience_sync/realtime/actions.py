"""The five ODP actions of the real-time path: field mappings in, request items out.

Each action mirrors the Segment "Optimizely Data Platform" / "Advanced Audience Targeting" action of
the same name (see ``odp-destination.md``): default field mappings, declared fields (the types and their
normalisation live in :mod:`~audience_sync.realtime.fields`) and the item layout of section 3.
Everything here is pure: no I/O, no clock, no configuration lookups.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from audience_sync.odp.regions import BATCH_CUSTOM_EVENT, BATCH_EMAIL_EVENT, BATCH_SYNC_AUDIENCE, BATCH_UPSERT_CONTACT
from audience_sync.realtime.fields import (
    Field,
    ValidationError,
    check,
    coerce,
    describe,
    drop_nulls,
    or_list,
    parse_date_like,
)
from audience_sync.realtime.mapping import UNDEFINED, compile_fields, resolve_fields, validate_mapping

__all__ = [
    "ACTIONS",
    "ALIASES",
    "PRODUCTS_ITEM",
    "Action",
    "BuildResult",
    "build_requests",
    "merge_fields",
    "resolve_action",
]


Builder = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Action:
    """One ODP action: declared fields, default mappings, endpoint path and item layout."""

    name: str
    title: str
    slug: str
    path: str
    fields: tuple[Field, ...]
    default_fields: Mapping[str, Any]
    default_trigger: str | None = None
    _builder: Builder = field(repr=False, compare=False, kw_only=True)

    def build_item(self, event: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
        """The request item for ``event`` under the (already merged) field mappings ``fields``.

        Raises :class:`ValidationError` with the exact message when the event cannot be sent, and
        :class:`~audience_sync.realtime.mapping.MappingError` when a mapping is malformed.
        """
        if not isinstance(event, Mapping):
            raise ValidationError(f"The event must be an object but it was {describe(event)}.")
        values = self.normalise(resolve_fields(fields, event))
        self.validate(values)
        return self._builder(values, event)

    def compile(self, fields: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
        """:meth:`build_item` under ``fields`` as a plain callable of the event, with the field mappings
        compiled once (:func:`~audience_sync.realtime.mapping.compile_fields`)."""
        resolve_all = compile_fields(fields)
        normalise, validate, builder = self.normalise, self.validate, self._builder

        def build(event: Mapping[str, Any]) -> dict[str, Any]:
            if not isinstance(event, Mapping):
                raise ValidationError(f"The event must be an object but it was {describe(event)}.")
            values = normalise(resolve_all(event))
            validate(values)
            return builder(values, event)

        return build

    def normalise(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """Steps 2 and 3 of the normalisation: drop missing values, coerce, strip unknown keys."""
        values: dict[str, Any] = {}
        for spec in self.fields:
            if spec.name not in resolved:
                continue
            value = resolved[spec.name]
            if value is None or value is UNDEFINED or value == "":
                continue
            if spec.properties is not None:
                value = drop_nulls(value)
            values[spec.name] = coerce(spec, value)
        return values

    def validate(self, values: Mapping[str, Any]) -> None:
        """Step 4: required fields (in declaration order), then each field's type and format."""
        for spec in self.fields:
            if spec.required and spec.name not in values:
                raise ValidationError(f"The root value is missing the required field '{spec.name}'.", spec.name)
        for spec in self.fields:
            if spec.choices is not None and values.get(spec.name) not in spec.choices:
                raise ValidationError(f"{spec.label} must be one of: {or_list(spec.choices)}.", spec.name)
            if spec.name in values:
                check(spec, values[spec.name])


def _put(item: dict[str, Any], key: str, values: Mapping[str, Any], source: str) -> None:
    """Set ``item[key]`` from ``values[source]``, or remove ``key`` when the value is missing."""
    item.pop(key, None)
    if source in values:
        item[key] = values[source]


# -- fields shared by the ODP actions ---------------------------------------------------------------

_IDENTIFIER_PROPERTIES: Final = (
    Field("anonymousId", "Segment Anonymous ID"),
    Field("userId", "Segment User ID"),
    Field("email", "Email"),
    Field("optimizely_vuid", "Optimizely VUID"),
    Field("fs_user_id", "Optimizely Feature Experimentation User ID"),
    Field("web_user_id", "Optimizely Web User ID"),
)

_USER_IDENTIFIERS: Final = Field(
    "user_identifiers", "User identifiers", "object", required=True, properties=_IDENTIFIER_PROPERTIES
)

_EMAIL_USER_IDENTIFIERS: Final = Field(
    "user_identifiers",
    "User identifiers",
    "object",
    required=True,
    properties=tuple(Field(p.name, p.label, required=True) if p.name == "email" else p for p in _IDENTIFIER_PROPERTIES),
)

_TIMESTAMP: Final = Field("timestamp", "Timestamp", required=True)


def _first_existing(primary: str, fallback: str) -> dict[str, Any]:
    return {"@if": {"exists": {"@path": primary}, "then": {"@path": primary}, "else": {"@path": fallback}}}


def _identifier_defaults(traits: str) -> dict[str, Any]:
    return {
        "anonymousId": {"@path": "$.anonymousId"},
        "userId": {"@path": "$.userId"},
        "email": _first_existing("$.properties.email", f"{traits}.email"),
        "optimizely_vuid": _first_existing("$.properties.optimizely_vuid", f"{traits}.optimizely_vuid"),
        "fs_user_id": {"@path": "$.userId"},
        "web_user_id": {"@path": "$.userId"},
    }


def _defaults(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(mapping)


PRODUCTS_ITEM: Final[Mapping[str, Any]] = MappingProxyType(
    {"product_id": {"@path": "$.product_id"}, "qty": {"@path": "$.quantity"}}
)


# -- upsert_contact ---------------------------------------------------------------------------------


def _personas_traits(event: Mapping[str, Any]) -> dict[str, Any]:
    """Extension: an Engage audience or computed trait on an identify becomes a user property."""
    if event.get("type") != "identify":
        return {}
    context = event.get("context")
    personas = context.get("personas") if isinstance(context, Mapping) else None
    traits = event.get("traits")
    if not isinstance(personas, Mapping) or not isinstance(traits, Mapping):
        return {}
    key = personas.get("computation_key")
    if personas.get("computation_class") not in ("audience", "trait") or not isinstance(key, str):
        return {}
    if traits.get(key) is None:
        return {}
    return {key: traits[key]}


def _upsert_contact_item(values: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    extra = values.get("additional_traits")
    item: dict[str, Any] = dict(extra) if isinstance(extra, Mapping) else {}
    item.update(_personas_traits(event))
    for key, source in (
        ("user_identifiers", "user_identifiers"),
        ("title", "title"),
        ("name", "name"),
        ("first_name", "firstname"),
        ("last_name", "lastname"),
        ("age", "age"),
    ):
        _put(item, key, values, source)
    birthday = parse_date_like(values["DOB"]) if "DOB" in values else None
    if birthday is not None:
        for key, part in (
            ("dob_year", birthday.year),
            ("dob_month", birthday.month),
            ("dob_day", birthday.day),
        ):
            item.pop(key, None)
            item[key] = part
    for key, source in (
        ("gender", "gender"),
        ("phone", "phone"),
        ("address", "address"),
        ("company", "company"),
        ("image_url", "avatar"),
    ):
        _put(item, key, values, source)
    return item


_TRAITS_PATH = "$.traits"
_UPSERT_CONTACT: Final = Action(
    name="upsert_contact",
    title="Upsert Contact",
    slug="upsertContact",
    path=BATCH_UPSERT_CONTACT,
    default_trigger='type = "identify"',
    fields=(
        _USER_IDENTIFIERS,
        Field("company", "Company Name"),
        Field("title", "Title"),
        Field("name", "Name"),
        Field("firstname", "First Name"),
        Field("lastname", "Last Name"),
        Field("gender", "Gender"),
        Field("DOB", "Birthday", "datetime"),
        Field("phone", "Phone"),
        Field("age", "Age", "number"),
        Field("avatar", "Avatar"),
        Field(
            "address",
            "Address",
            "object",
            properties=(
                Field("street", "Street"),
                Field("city", "City"),
                Field("state", "State"),
                Field("zip", "Zip code"),
                Field("country", "Country"),
            ),
        ),
        Field("additional_traits", "Additional User Traits", "object"),
    ),
    default_fields=_defaults(
        {
            "user_identifiers": _identifier_defaults(_TRAITS_PATH),
            "company": {"@path": "$.traits.company"},
            "title": {"@path": "$.traits.title"},
            "name": {"@path": "$.traits.name"},
            "firstname": {"@path": "$.traits.first_name"},
            "lastname": {"@path": "$.traits.last_name"},
            "gender": {"@path": "$.traits.gender"},
            "DOB": {"@path": "$.traits.birthday"},
            "phone": {"@path": "$.traits.phone"},
            "age": {"@path": "$.traits.age"},
            "avatar": {"@path": "$.traits.avatar"},
            "address": {
                "street": {"@path": "$.traits.address.street"},
                "city": {"@path": "$.traits.address.city"},
                "state": {"@path": "$.traits.address.state"},
                "zip": {"@path": "$.traits.address.postalCode"},
                "country": {"@path": "$.traits.address.country"},
            },
        }
    ),
    _builder=_upsert_contact_item,
)


# -- email_event ------------------------------------------------------------------------------------


def _email_event_item(values: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "email"}
    _put(item, "action", values, "event_action")
    _put(item, "campaign", values, "campaign")
    _put(item, "campaign_id", values, "campaign_id")
    _put(item, "user_identifiers", values, "user_identifiers")
    item["campaign_event_value"] = values.get("link_url")
    _put(item, "timestamp", values, "timestamp")
    return item


_EMAIL_EVENT: Final = Action(
    name="email_event",
    title="Email Event",
    slug="emailEvent",
    path=BATCH_EMAIL_EVENT,
    fields=(
        _EMAIL_USER_IDENTIFIERS,
        Field("event_action", "Optimizely Event Action", required=True),
        Field("campaign", "Campaign Name", required=True),
        Field("campaign_id", "Campaign ID"),
        Field("link_url", "Link URL"),
        _TIMESTAMP,
    ),
    default_fields=_defaults(
        {
            "user_identifiers": _identifier_defaults("$.context.traits"),
            "campaign": {"@path": "$.properties.campaign_name"},
            "campaign_id": {"@path": "$.properties.campaign_id"},
            "link_url": {"@path": "$.properties.link_url"},
            "timestamp": {"@path": "$.timestamp"},
        }
    ),
    _builder=_email_event_item,
)


# -- ecommerce_event and custom_event (both /batch_custom_event) ------------------------------------


def _event_head(values: Mapping[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    _put(item, "user_identifiers", values, "user_identifiers")
    _put(item, "action", values, "event_action")
    item["type"] = values.get("event_type", "custom")
    _put(item, "timestamp", values, "timestamp")
    return item


def _ecommerce_event_item(values: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    item = _event_head(values)
    for key in ("order_id", "total", "products"):
        _put(item, key, values, key)
    return item


def _custom_event_item(values: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    item = _event_head(values)
    _put(item, "data", values, "data")
    return item


_ECOMMERCE_EVENT: Final = Action(
    name="ecommerce_event",
    title="Ecommerce Event",
    slug="customEvent",
    path=BATCH_CUSTOM_EVENT,
    fields=(
        _USER_IDENTIFIERS,
        Field("event_type", "Optimizely Event Type"),
        Field("event_action", "Optimizely Event Action", required=True),
        Field(
            "products",
            "Product details",
            "object",
            multiple=True,
            properties=(Field("product_id", "Product ID"), Field("qty", "Quantity", "number")),
        ),
        Field("order_id", "Order ID"),
        Field("total", "Order Total"),
        _TIMESTAMP,
    ),
    default_fields=_defaults(
        {
            "user_identifiers": _identifier_defaults(_TRAITS_PATH),
            "event_type": {"@path": "$.event"},
            "products": {"@arrayPath": ["$.properties.products", dict(PRODUCTS_ITEM)]},
            "order_id": {"@path": "$.properties.order_id"},
            "total": {"@path": "$.properties.total"},
            "timestamp": {"@path": "$.timestamp"},
        }
    ),
    _builder=_ecommerce_event_item,
)

_CUSTOM_EVENT: Final = Action(
    name="custom_event",
    title="Custom Event",
    slug="nonEcommCustomEvent",
    path=BATCH_CUSTOM_EVENT,
    fields=(
        _USER_IDENTIFIERS,
        Field("event_type", "Optimizely Event Type"),
        Field("event_action", "Optimizely Event Action"),
        Field("data", "Event Properties", "object"),
        _TIMESTAMP,
    ),
    default_fields=_defaults(
        {
            "user_identifiers": _identifier_defaults(_TRAITS_PATH),
            "event_type": {"@path": "$.event"},
            "data": {"@path": "$.properties"},
            "timestamp": {"@path": "$.timestamp"},
        }
    ),
    _builder=_custom_event_item,
)


# -- sync_audience ----------------------------------------------------------------------------------


def _subscription(key: Any, event: Mapping[str, Any]) -> Any:
    """``traits[key]`` when the event's top-level traits hold it, else ``properties[key]``."""
    if not isinstance(key, str):
        return UNDEFINED
    for container_name in ("traits", "properties"):
        container = event.get(container_name)
        if isinstance(container, Mapping) and container.get(key) is not None:
            return container[key]
    return UNDEFINED


def _sync_audience_item(values: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    _put(item, "audienceId", values, "segment_computation_id")
    _put(item, "audienceName", values, "custom_audience_name")
    _put(item, "timestamp", values, "timestamp")
    subscription = _subscription(values.get("custom_audience_name"), event)
    if subscription is not UNDEFINED:
        item["subscription"] = subscription
    _put(item, "userId", values, "optimizelyUserId")
    return item


_SYNC_AUDIENCE: Final = Action(
    name="sync_audience",
    title="Sync Audience",
    slug="syncAudience",
    path=BATCH_SYNC_AUDIENCE,
    fields=(
        Field("custom_audience_name", "Custom Audience Name"),
        Field("segment_computation_action", "Segment Computation Action", choices=("audience", "journey_step")),
        Field("segment_computation_id", "Segment Computation ID"),
        Field("optimizelyUserId", "Optimizely User ID", required=True),
        _TIMESTAMP,
    ),
    default_fields=_defaults(
        {
            "custom_audience_name": {"@path": "$.context.personas.computation_key"},
            "segment_computation_action": {"@path": "$.context.personas.computation_class"},
            "segment_computation_id": {"@path": "$.context.personas.computation_id"},
            "optimizelyUserId": _first_existing("$.userId", "$.anonymousId"),
            "timestamp": {"@path": "$.timestamp"},
        }
    ),
    _builder=_sync_audience_item,
)


# -- registry ---------------------------------------------------------------------------------------

ACTIONS: Final[Mapping[str, Action]] = MappingProxyType(
    {a.name: a for a in (_UPSERT_CONTACT, _EMAIL_EVENT, _ECOMMERCE_EVENT, _CUSTOM_EVENT, _SYNC_AUDIENCE)}
)
"""Canonical action name -> action."""

ALIASES: Final[Mapping[str, str]] = MappingProxyType({a.slug: a.name for a in ACTIONS.values()})
"""Segment's action slugs -> canonical names (``customEvent`` is the Ecommerce Event action)."""


def resolve_action(name: str) -> Action:
    """The action called ``name`` (canonical or Segment slug); ``ValueError`` naming the valid ones."""
    canonical = ALIASES.get(name, name)
    if canonical not in ACTIONS:
        raise ValueError(
            f"unknown action {name!r}: must be one of {', '.join(ACTIONS)} (or Segment's {', '.join(ALIASES)})"
        )
    return ACTIONS[canonical]


def merge_fields(action: Action, user_fields: Mapping[str, Any] | None, use_defaults: bool = True) -> dict[str, Any]:
    """The field mappings to resolve: ``user_fields`` shallow-merged over the action's defaults.

    A user's object (``user_identifiers``, ``address``) replaces the whole default object. With
    ``use_defaults=False`` the user's fields are used alone.
    """
    merged: dict[str, Any] = copy.deepcopy(dict(action.default_fields)) if use_defaults else {}
    merged.update(copy.deepcopy(dict(user_fields or {})))
    return merged


@dataclass
class BuildResult:
    """The outcome of building one batch: at most one request, plus the invalid events by index
    (``error_fields``: the field at fault of each, when the error names one)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_fields: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """``{"requests": [...], "errors": [...]}`` as ``test-event --json`` prints it."""
        return {"requests": self.requests, "errors": self.errors}


def build_requests(
    action: str,
    events: Sequence[Mapping[str, Any]],
    fields: Mapping[str, Any] | None,
    *,
    use_defaults: bool,
    base: str,
) -> BuildResult:
    """Build the ODP request for ``events`` as one batch.

    Every valid event becomes one item of a single ``POST {base}{action.path}`` whose body is the
    array of items; invalid events are reported as ``{"index", "message"}`` and left out. No request
    is built when no event is valid. Raises ``ValueError`` for an unknown action and
    :class:`~audience_sync.realtime.mapping.MappingError` for a malformed mapping.
    """
    resolved_action = resolve_action(action)
    mapping = merge_fields(resolved_action, fields, use_defaults)
    validate_mapping(mapping)
    result = BuildResult()
    items: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        try:
            items.append(resolved_action.build_item(event, mapping))
        except ValidationError as exc:
            result.errors.append({"index": index, "message": str(exc)})
            if exc.field:
                result.error_fields[index] = exc.field
    if items:
        url = base.rstrip("/") + resolved_action.path
        result.requests.append({"method": "POST", "url": url, "body": items})
    return result
