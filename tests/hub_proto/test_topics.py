"""Tests of hub_proto.topics and hub_proto.message: every builder/parser pair, both sides."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    DEFAULT_API_VERSION,
    SYSTEM_PROPERTIES,
    C2DTopic,
    DesiredPatchTopic,
    HubParseError,
    Message,
    MethodRequestTopic,
    MethodResponseTopic,
    TelemetryTopic,
    TwinRequestTopic,
    TwinResponseTopic,
    c2d_subscribe_topic,
    c2d_topic,
    client_id,
    desired_patch_topic,
    method_request_topic,
    method_response_topic,
    parse_c2d_topic,
    parse_client_id,
    parse_desired_patch_topic,
    parse_method_request_topic,
    parse_method_response_topic,
    parse_published_topic,
    parse_received_topic,
    parse_telemetry_topic,
    parse_twin_request_topic,
    parse_twin_response_topic,
    parse_username,
    telemetry_topic,
    twin_get_topic,
    twin_patch_reported_topic,
    twin_response_topic,
    username,
)
from hub_proto.message import message_properties

from .strategies import ID_ALPHABET, SPECIAL, device_ids, messages, rids, texts, versions

SETTINGS = settings(max_examples=150, deadline=None)
HOST = "myhub.azure-devices.net"

# -- literal formats ---------------------------------------------------------------------------


def test_literal_topics() -> None:
    assert username(HOST, "dev") == f"{HOST}/dev/?api-version=2021-04-12"
    assert username(HOST, "dev", "mod") == f"{HOST}/dev/mod/?api-version=2021-04-12"
    assert username(
        HOST,
        "my_device",
        api_version="2020-09-30",
        client_type="azsdk-c/1.0",
        model_id="dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1",
    ) == (
        f"{HOST}/my_device/?api-version=2020-09-30&DeviceClientType=azsdk-c%2F1.0"
        "&model-id=dtmi%3AYOUR_COMPANY_NAME_HERE%3Asample_device%3B1"
    )
    assert client_id("dev") == "dev" and client_id("dev", "mod") == "dev/mod"
    assert telemetry_topic("dev") == "devices/dev/messages/events/"
    assert telemetry_topic("dev", module_id="m") == "devices/dev/modules/m/messages/events/"
    assert telemetry_topic(
        "dev",
        Message(
            b"{}",
            {"temp alert": "true"},
            message_id="m1",
            content_type="application/json",
            content_encoding="utf-8",
        ),
    ) == (
        "devices/dev/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8"
        "&temp%20alert=true"
    )
    assert c2d_subscribe_topic("dev") == "devices/dev/messages/devicebound/#"
    assert c2d_topic("fake_device", Message(message_id="6b82")) == (
        "devices/fake_device/messages/devicebound/%24.mid=6b82"
        "&%24.to=%2Fdevices%2Ffake_device%2Fmessages%2FdeviceBound"
    )
    assert twin_get_topic("1") == "$iothub/twin/GET/?$rid=1"
    assert twin_patch_reported_topic("2") == "$iothub/twin/PATCH/properties/reported/?$rid=2"
    assert twin_response_topic(200, "1") == "$iothub/twin/res/200/?$rid=1"
    assert twin_response_topic(204, "2", 7) == "$iothub/twin/res/204/?$rid=2&$version=7"
    assert desired_patch_topic(5) == "$iothub/twin/PATCH/properties/desired/?$version=5"
    assert method_request_topic("reboot", "9") == "$iothub/methods/POST/reboot/?$rid=9"
    assert method_response_topic(200, "9") == "$iothub/methods/res/200/?$rid=9"
    assert method_response_topic(-1, "a&b") == "$iothub/methods/res/-1/?$rid=a%26b"


def test_device_ids_are_never_encoded() -> None:
    odd = "a:b.c+d%e_f#g*h?i!j(k)l,m=n@o;p$q'r"
    assert telemetry_topic(odd).startswith(f"devices/{odd}/messages/events/")
    assert username(HOST, odd).startswith(f"{HOST}/{odd}/?")
    assert parse_telemetry_topic(f"devices/{odd}/messages/events/").device_id == odd
    assert parse_username(f"{HOST}/{odd}/?api-version=1").device_id == odd


# -- username and client id --------------------------------------------------------------------


@SETTINGS
@given(
    device_id=device_ids,
    module_id=st.one_of(st.none(), device_ids),
    api_version=st.sampled_from([DEFAULT_API_VERSION, "2020-09-30", "2019-10-01"]),
    client_type=st.one_of(st.none(), st.text(min_size=1)),
    model_id=st.one_of(st.none(), st.text(min_size=1)),
)
def test_username_round_trip(
    device_id: str,
    module_id: str | None,
    api_version: str,
    client_type: str | None,
    model_id: str | None,
) -> None:
    text = username(
        HOST,
        device_id,
        module_id,
        api_version=api_version,
        client_type=client_type,
        model_id=model_id,
    )
    parsed = parse_username(text)
    assert (parsed.host, parsed.device_id, parsed.module_id) == (HOST, device_id, module_id)
    assert (parsed.api_version, parsed.client_type, parsed.model_id) == (
        api_version,
        client_type,
        model_id,
    )
    assert parse_client_id(client_id(device_id, module_id)) == (device_id, module_id)


@pytest.mark.parametrize(
    "text",
    [
        "",
        HOST,
        f"{HOST}/dev",
        f"{HOST}/dev/",  # no api-version
        f"{HOST}/dev/?x=1",
        f"{HOST}/dev/?api-version=",
        f"{HOST}/dev/?api-version",
        "/dev/?api-version=1",
        f"{HOST}//?api-version=1",
        f"{HOST}/dev/mod/x/?api-version=1",
        f"{HOST}/de v/?api-version=1",
        f"{HOST}/dev/?api-version=1&api-version=2",
        f"{HOST}/{'d' * 129}/?api-version=1",
    ],
)
def test_parse_username_rejects(text: str) -> None:
    with pytest.raises(HubParseError):
        parse_username(text)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("", "dev"), {}),
        (("h/x", "dev"), {}),
        ((HOST, ""), {}),
        ((HOST, "a/b"), {}),
        ((HOST, "dev", ""), {}),
        ((HOST, "d\u00e9v"), {}),
        ((HOST, "x" * 129), {}),
    ],
)
def test_username_rejects(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(HubParseError):
        username(*args, **kwargs)


# -- telemetry ---------------------------------------------------------------------------------


@SETTINGS
@given(device_id=device_ids, module_id=st.one_of(st.none(), device_ids), message=messages)
def test_telemetry_round_trip(device_id: str, module_id: str | None, message: Message) -> None:
    parsed = parse_telemetry_topic(telemetry_topic(device_id, message, module_id))
    assert (parsed.device_id, parsed.module_id) == (device_id, module_id)
    assert parsed.message == dataclasses.replace(message, payload=b"")
    assert parse_published_topic(telemetry_topic(device_id, message, module_id)) == parsed


@SETTINGS
@given(message=messages, data=st.data())
def test_telemetry_accepts_both_dollar_spellings(message: Message, data: st.DataObject) -> None:
    """Senders write ``$.mid`` or ``%24.mid``; keys in any order; optional ``?``."""
    from hub_proto.properties import encode_component

    pairs = []
    for key, value in message_properties(message).items():
        enc_key = encode_component(key)
        if key in SYSTEM_PROPERTIES.values():
            enc_key = data.draw(st.sampled_from([key, "%24" + key[1:]]))
        pairs.append(f"{enc_key}={encode_component(value)}")
    pairs = data.draw(st.permutations(pairs))
    leading = data.draw(st.sampled_from(["", "?"]))
    parsed = parse_telemetry_topic("devices/d/messages/events/" + leading + "&".join(pairs))
    assert parsed.message == dataclasses.replace(message, payload=b"")


def test_telemetry_parse_examples() -> None:
    assert parse_telemetry_topic("devices/d/messages/events") == TelemetryTopic(
        "d", None, Message()
    )
    parsed = parse_telemetry_topic("devices/d/modules/m/messages/events/%24.on=out1&k")
    assert parsed == TelemetryTopic("d", "m", Message(properties={"k": ""}, output_name="out1"))
    # an unknown '$.' key (e.g. PnP's $.ifid) stays an application property
    assert parse_telemetry_topic("devices/d/messages/events/%24.ifid=x").message.properties == {
        "$.ifid": "x"
    }
    # a device whose id is 'modules' is not a module
    assert parse_telemetry_topic("devices/modules/messages/events/").device_id == "modules"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "devices",
        "devices/d",
        "devices//messages/events/",
        "devices/d/messages/event/",
        "devices/d/messages/devicebound/",
        "devices/d/modules//messages/events/",
        "devices/d/modules/m/messages/",
        "devices/d\u00e9/messages/events/",
        "Devices/d/messages/events/",
        "devices/d/messages/events/a=1&a=2",
        "devices/d/messages/events/=1",
        "$iothub/twin/GET/?$rid=1",
    ],
)
def test_parse_telemetry_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_telemetry_topic(topic)


@pytest.mark.parametrize(
    "message",
    [
        Message(properties={"$.mid": "x"}),
        Message(properties={"$.to": "x"}),
        Message(properties={"": "x"}),
        Message(payload="text"),  # type: ignore[arg-type]
        Message(message_id=5),  # type: ignore[arg-type]
        Message(properties={"k": 1}),  # type: ignore[dict-item]
        Message(properties={"k": "x" * 70000}),
    ],
)
def test_telemetry_topic_rejects(message: Message) -> None:
    with pytest.raises(HubParseError):
        telemetry_topic("d", message)


# -- cloud-to-device ---------------------------------------------------------------------------


@SETTINGS
@given(device_id=device_ids, message=messages)
def test_c2d_round_trip(device_id: str, message: Message) -> None:
    topic = c2d_topic(device_id, message)
    assert "%24.to=%2Fdevices%2F" in topic
    parsed = parse_c2d_topic(topic)
    assert parsed == C2DTopic(device_id, dataclasses.replace(message, payload=b""))
    assert parse_received_topic(topic) == parsed


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("devices/d/messages/devicebound/", Message()),
        ("devices/d/messages/devicebound", Message()),
        (
            "devices/d/messages/devicebound/%24.mid=6b82&%24.to=%2Fdevices%2Fd%2Fmessages"
            "%2Fdevicebound",
            Message(message_id="6b82"),
        ),
        (
            "devices/d/messages/devicebound/?prop1&prop2=&prop3=a%20string",
            Message(properties={"prop1": "", "prop2": "", "prop3": "a string"}),
        ),
        (
            "devices/d/messages/devicebound/$.cid=c&iothub-ack=full",
            Message(properties={"iothub-ack": "full"}, correlation_id="c"),
        ),
    ],
)
def test_c2d_parse_examples(topic: str, message: Message) -> None:
    assert parse_c2d_topic(topic).message == message


@pytest.mark.parametrize(
    "topic",
    [
        "devices/useragent_c/message#$vicebound/a=1",
        "devices/d/messages/events/",
        "devices//messages/devicebound/",
        "devices/d/messages/devicebound/a&a",
        "$iothub/twin/res/200/?$rid=1",
    ],
)
def test_parse_c2d_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_c2d_topic(topic)


# -- twin --------------------------------------------------------------------------------------


@SETTINGS
@given(
    status=st.one_of(st.integers(100, 599), st.integers(0, 99999)),
    rid=rids,
    version=st.one_of(st.none(), versions),
)
def test_twin_response_round_trip(status: int, rid: str, version: int | None) -> None:
    topic = twin_response_topic(status, rid, version)
    parsed = parse_twin_response_topic(topic)
    assert (parsed.status, parsed.rid, parsed.version) == (status, rid, version)
    assert parse_received_topic(topic) == parsed


@SETTINGS
@given(version=versions)
def test_desired_patch_round_trip(version: int) -> None:
    topic = desired_patch_topic(version)
    assert parse_desired_patch_topic(topic).version == version
    assert parse_received_topic(topic) == DesiredPatchTopic(version, {"$version": str(version)})


@SETTINGS
@given(rid=rids)
def test_twin_request_round_trip(rid: str) -> None:
    get = parse_twin_request_topic(twin_get_topic(rid))
    patch = parse_twin_request_topic(twin_patch_reported_topic(rid))
    assert (get.kind, get.rid) == ("get", rid)
    assert (patch.kind, patch.rid) == ("patch_reported", rid)
    assert parse_published_topic(twin_get_topic(rid)) == get


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("$iothub/twin/res/200/?$rid=1", (200, "1", None)),
        ("$iothub/twin/res/204/?$version=3&$rid=x", (204, "x", 3)),
        ("$iothub/twin/res/204/?%24rid=1&%24version=03", (204, "1", 3)),
        ("$iothub/twin/res/429/$rid=1&extra=y", (429, "1", None)),
        ("$iothub/twin/res/0500/?$rid=a%2Fb", (500, "a/b", None)),
    ],
)
def test_twin_response_examples(topic: str, expected: tuple[int, str, int | None]) -> None:
    parsed = parse_twin_response_topic(topic)
    assert (parsed.status, parsed.rid, parsed.version) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/res/200",  # no '/' after the status (ESDK: unexpected end)
        "$iothub/twin/res/200/",  # no $rid
        "$iothub/twin/res/200/?$rid",
        "$iothub/twin/res/200/?$rid=",
        "$iothub/twin/res//?$rid=1",
        "$iothub/twin/res/abc/?$rid=1",
        "$iothub/twin/res/-1/?$rid=1",
        "$iothub/twin/res/100000/?$rid=1",
        "$iothub/twin/res/\u0662\u0660\u0660/?$rid=1",
        "$iothub/twin/res/204/?$rid=1&$version=x",
        "$iothub/twin/res/204/?$rid=1&$version",
        "$iothub/twin/res/204/?$rid=1&$version=-1",
        "$iothub/twin/res/204/?$rid=1&$version=99999999999999999999",
        "$iothub/twin/res/204/?$rid=1&$rid=2",
        "$iothub/twin/rez/200/?$rid=1",
        "$iothub/contoso/res/200/?$rid=1",
        "devices/my_device/$iothub/twin/res/200/?$rid=1",
    ],
)
def test_parse_twin_response_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_twin_response_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/PATCH/properties/desired/",
        "$iothub/twin/PATCH/properties/desired/?$version=",
        "$iothub/twin/PATCH/properties/desired/?$version",
        "$iothub/twin/PATCH/properties/desired/?$version=1.5",
        "$iothub/twin/PATCH/properties/desired/?$version=1&$version=2",
        "$iothub/twin/PATCH/properties/reported/?$version=1",
    ],
)
def test_parse_desired_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_desired_patch_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/GET/",
        "$iothub/twin/GET/?$rid=",
        "$iothub/twin/GET?$rid=1",
        "$iothub/twin/PATCH/properties/reported/?x=1",
        "$iothub/twin/PATCH/properties/desired/?$rid=1",
        "$iothub/twin/res/200/?$rid=1",
    ],
)
def test_parse_twin_request_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_twin_request_topic(topic)


@pytest.mark.parametrize(
    ("builder", "args"),
    [
        (twin_get_topic, ("",)),
        (twin_patch_reported_topic, (None,)),
        (twin_response_topic, (-1, "1")),
        (twin_response_topic, (100000, "1")),
        (twin_response_topic, (True, "1")),
        (twin_response_topic, ("200", "1")),
        (twin_response_topic, (200, "1", -1)),
        (twin_response_topic, (200, "1", 2**63)),
        (desired_patch_topic, (-1,)),
        (desired_patch_topic, ("1",)),
        (method_request_topic, ("", "1")),
        (method_request_topic, ("a/b", "1")),
        (method_request_topic, ("a#", "1")),
        (method_request_topic, ("m", "")),
        (method_response_topic, (2**31, "1")),
        (method_response_topic, (1.0, "1")),
        (method_response_topic, (200, "")),
        (twin_get_topic, ("\ud800",)),
    ],
)
def test_builders_reject(builder: Callable[..., str], args: tuple[Any, ...]) -> None:
    with pytest.raises(HubParseError):
        builder(*args)


# -- direct methods ----------------------------------------------------------------------------

method_names = st.text(min_size=1).filter(lambda n: not set(n) & set("/#+\x00"))


@SETTINGS
@given(
    name=st.one_of(
        method_names, st.text(ID_ALPHABET.replace("#", "").replace("+", ""), min_size=1)
    ),
    rid=rids,
)
def test_method_request_round_trip(name: str, rid: str) -> None:
    topic = method_request_topic(name, rid)
    parsed = parse_method_request_topic(topic)
    assert (parsed.name, parsed.rid) == (name, rid)
    assert parse_received_topic(topic) == parsed


@SETTINGS
@given(status=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 65535)), rid=rids)
def test_method_response_round_trip(status: int, rid: str) -> None:
    topic = method_response_topic(status, rid)
    parsed = parse_method_response_topic(topic)
    assert (parsed.status, parsed.rid) == (status, rid)
    assert parse_published_topic(topic) == parsed


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/methods/POST/",
        "$iothub/methods/POST/m",
        "$iothub/methods/POST//?$rid=1",
        "$iothub/methods/POST/m/?",
        "$iothub/methods/POST/m/?$rid=",
        "$iothub/methods/res/200/?$rid=1",
        "$iothub/twin/res/200/?$rid=1&$version=1x",
    ],
)
def test_parse_method_request_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_method_request_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/methods/res/200",
        "$iothub/methods/res/200/?",
        "$iothub/methods/res/x/?$rid=1",
        "$iothub/methods/res/--1/?$rid=1",
        "$iothub/methods/res/-/?$rid=1",
        "$iothub/methods/res/2147483648/?$rid=1",
        "$iothub/methods/res/99999999999/?$rid=1",
    ],
)
def test_parse_method_response_rejects(topic: str) -> None:
    with pytest.raises(HubParseError):
        parse_method_response_topic(topic)


def test_method_request_examples() -> None:
    parsed = parse_method_request_topic("$iothub/methods/POST/thermostat*getMaxMin/?$rid=a%26")
    assert parsed == MethodRequestTopic("thermostat*getMaxMin", "a&", {"$rid": "a&"})
    assert parse_method_response_topic("$iothub/methods/res/65535/?$rid=7") == (
        MethodResponseTopic(65535, "7", {"$rid": "7"})
    )


# -- dispatch ----------------------------------------------------------------------------------


def test_dispatch_types() -> None:
    assert isinstance(parse_received_topic("$iothub/twin/res/200/?$rid=1"), TwinResponseTopic)
    assert isinstance(parse_published_topic("$iothub/twin/GET/?$rid=1"), TwinRequestTopic)
    for topic in ("devices/d/messages/events/", "$iothub/methods/res/200/?$rid=1", "x"):
        with pytest.raises(HubParseError):
            parse_received_topic(topic)
    for topic in ("devices/d/messages/devicebound/", "$iothub/methods/POST/m/?$rid=1", ""):
        with pytest.raises(HubParseError):
            parse_published_topic(topic)


# -- arbitrary input ---------------------------------------------------------------------------

PARSERS: list[Callable[[str], object]] = [
    parse_username,
    parse_client_id,
    parse_telemetry_topic,
    parse_c2d_topic,
    parse_twin_response_topic,
    parse_desired_patch_topic,
    parse_twin_request_topic,
    parse_method_request_topic,
    parse_method_response_topic,
    parse_received_topic,
    parse_published_topic,
]
PREFIXES = [
    "",
    "devices/d/messages/events/",
    "devices/d/modules/m/messages/events/",
    "devices/d/messages/devicebound/",
    "$iothub/twin/res/",
    "$iothub/twin/res/200/?",
    "$iothub/twin/GET/?",
    "$iothub/twin/PATCH/properties/reported/?",
    "$iothub/twin/PATCH/properties/desired/?",
    "$iothub/methods/POST/",
    "$iothub/methods/res/",
    f"{HOST}/dev/",
]
topic_texts = st.one_of(
    st.text(),
    st.builds(
        lambda p, t: p + t,
        st.sampled_from(PREFIXES),
        st.text(SPECIAL + "$rid=version0123456789-/?&%24", max_size=40),
    ),
)


@settings(max_examples=400, deadline=None)
@given(text=topic_texts)
def test_arbitrary_input_only_parse_error(text: str) -> None:
    for parser in PARSERS:
        with contextlib.suppress(HubParseError):
            parser(text)


@pytest.mark.parametrize("bad", [None, b"$iothub/twin/res/200/?$rid=1", 200, ["x"]])
def test_parsers_reject_non_strings(bad: object) -> None:
    for parser in PARSERS:
        with pytest.raises(HubParseError):
            parser(bad)  # type: ignore[arg-type]


@SETTINGS
@given(text=texts)
def test_message_text_fields_round_trip_through_c2d(text: str) -> None:
    message = Message(properties={"p": text}, user_id=text, expiry_time=text)
    assert parse_c2d_topic(c2d_topic("d", message)).message == message
