"""The pure protocol core: framing, identities, membership, capability ads. No network."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from teammesh.protocols import wire
from teammesh.protocols.capability import CapabilityAd, PeerTable, open_ad
from teammesh.protocols.errors import (
    BadSignature,
    FrameTooLarge,
    InviteError,
    LocalProtocolError,
    MalformedMessage,
    NotAMember,
    RemoteProtocolError,
)
from teammesh.protocols.identity import (
    Identity,
    is_peer_id,
    public_from_peer_id,
    verify,
    verify_by_peer,
)
from teammesh.protocols.membership import (
    ROLE_ADMIN,
    ROLE_MEMBER,
    Invite,
    Roster,
    TeamInfo,
    check_enroll_request,
    enroll_request,
    issue_certificate,
    issue_epoch_notice,
    issue_revocation,
    parse_certificate,
    parse_epoch_notice,
)

NOW = 1_700_000_000
DAY = 24 * 3600


def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


# --- wire -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 300, 16383, 16384, 2**32 - 1, 2**63, 2**64 - 1])
def test_varint_round_trip(n: int) -> None:
    enc = wire.encode_varint(n)
    assert wire.decode_varint(enc) == (n, len(enc))
    # embedded in a buffer at an offset, followed by other bytes
    assert wire.decode_varint(b"\xaa" + enc + b"\x01", 1) == (n, 1 + len(enc))
    # cut short: no value yet
    assert wire.decode_varint(enc[:-1]) is None


@given(st.integers(min_value=0, max_value=2**70 - 1))
def test_varint_round_trip_fuzz(n: int) -> None:
    enc = wire.encode_varint(n)
    assert wire.decode_varint(enc) == (n, len(enc))


def test_varint_rejects_negative_and_endless() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode_varint(-1)
    with pytest.raises(MalformedMessage):
        wire.decode_varint(b"\xff" * 10)
    assert wire.decode_varint(b"\xff" * 9) is None


def test_read_varint_is_strict_where_asked() -> None:
    assert wire.read_varint(b"\x05\xac\x02\x07", 1, 3) == (300, 3)
    with pytest.raises(MalformedMessage, match="truncated"):
        wire.read_varint(b"\xac\x02", 0, 1)  # the end bound counts, not len(buf)
    with pytest.raises(MalformedMessage, match="longer than 9 bytes"):
        wire.read_varint(b"\x80" * 9 + b"\x01", max_bytes=9)
    assert wire.read_varint(b"\x80\x00") == (0, 2)  # allowed on the wire...
    with pytest.raises(MalformedMessage, match="non-minimal"):
        wire.read_varint(b"\x80\x00", minimal=True)  # ...but not in a CID


def test_frame_decoder_byte_by_byte() -> None:
    msgs = [{"t": "a", "v": 1, "n": i, "blob": b"x" * (i * 50)} for i in range(6)]
    stream = b"".join(wire.frame_message(m) for m in msgs)
    dec = wire.FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert [wire.unpack(f) for f in out] == msgs
    assert dec.pending == 0


def test_frame_decoder_split_anywhere_and_batched() -> None:
    frames = [wire.frame(b""), wire.frame(b"abc"), wire.frame(b"z" * 1000)]
    stream = b"".join(frames)
    for cut in range(len(stream) + 1):
        dec = wire.FrameDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == [b"", b"abc", b"z" * 1000]
    # a partial frame stays pending
    dec = wire.FrameDecoder()
    assert dec.feed(frames[2][:10]) == []
    assert dec.pending == 10


def test_frame_too_large_raises_before_the_body_arrives() -> None:
    dec = wire.FrameDecoder(max_frame=100)
    assert dec.feed(wire.frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(FrameTooLarge):
        dec.feed(wire.encode_varint(101))  # the header alone is enough
    with pytest.raises(FrameTooLarge):
        wire.FrameDecoder(max_frame=1024).feed(wire.encode_varint(2**62))
    with pytest.raises(FrameTooLarge):
        wire.unpack(wire.pack({"t": "a", "v": 1, "x": b"y" * 200}), max_bytes=100)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x91\x01",  # empty, reserved byte, array
    wire.pack({"v": 1}), wire.pack({"t": 5, "v": 1}), wire.pack({"t": "a", "v": 2}),
    wire.pack({"t": "a"}), b"\x81\x01\x02",  # int map key
    b"\x81\x81\xa1a\x01\x01",  # a map used as a map key
    # a bytes map key, at the top and nested (strict_map_key admits bytes; found by fuzzing)
    b"\x83\xa1t\xa1a\xa1v\x01\xc4\x00\x00",
    b"\x83\xa1t\xa1a\xa1v\x01\xa1d\x91\x81\xc4\x01k\x00",
])
def test_unpack_rejects_bad_envelopes(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        wire.unpack(data)


def test_pack_rejects_unencodable() -> None:
    with pytest.raises(LocalProtocolError):
        wire.pack({"t": "a", "v": 1, "x": object()})


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_unpack_fuzz_raises_only_remote_protocol_errors(data: bytes) -> None:
    try:
        m = wire.unpack(data, max_bytes=256)
    except RemoteProtocolError:
        return
    assert isinstance(m, dict)
    assert isinstance(m["t"], str)
    assert m["v"] == 1


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_frame_decoder_fuzz_raises_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    dec = wire.FrameDecoder(max_frame=128)
    try:
        for c in chunks:
            for f in dec.feed(c):
                assert len(f) <= 128
                try:
                    wire.unpack(f)
                except RemoteProtocolError:
                    pass
    except RemoteProtocolError:
        pass


@settings(max_examples=200)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids,
                                                             max_size=4),
    max_leaves=20))
def test_any_msgpack_value_unpacks_or_is_rejected(value: object) -> None:
    for obj in (value, {"t": "x", "v": 1, "body": value}):
        data = wire.pack(obj)  # type: ignore[arg-type]
        try:
            wire.unpack(data)
        except RemoteProtocolError:
            pass


# --- identity -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [bytes(range(32)), b"\x00" * 32, b"\xff" * 32, bytes([7]) * 32])
def test_peer_id_matches_libp2p(seed: bytes) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    kp = create_new_key_pair(seed)
    ident_ = Identity(seed)
    assert ident_.peer_id == ID.from_pubkey(kp.public_key).to_base58()
    assert ident_.public == kp.public_key.to_bytes()
    assert public_from_peer_id(ident_.peer_id) == ident_.public
    assert ident_.peer_id.startswith("12D3KooW")
    assert is_peer_id(ident_.peer_id)


def test_known_peer_id_for_fixed_seed() -> None:
    # the value recorded in the py-libp2p notes for seed bytes(range(32))
    assert Identity(bytes(range(32))).peer_id == \
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"


def test_sign_verify_and_domain_separation() -> None:
    a, b = ident(1), ident(2)
    sig = a.sign("cert", b"body")
    verify(a.public, "cert", b"body", sig)
    verify_by_peer(a.peer_id, "cert", b"body", sig)
    with pytest.raises(BadSignature):
        verify(a.public, "cap", b"body", sig)  # another domain
    with pytest.raises(BadSignature):
        verify(a.public, "cert", b"body!", sig)
    with pytest.raises(BadSignature):
        verify_by_peer(b.peer_id, "cert", b"body", sig)  # another signer
    with pytest.raises(BadSignature):
        verify(a.public, "cert", b"body", flip(sig, 10))
    with pytest.raises(BadSignature):
        verify(a.public, "cert", b"body", sig[:63])
    # the domain separator cannot be shifted into the body
    with pytest.raises(BadSignature):
        verify(a.public, "cer", b"t\0body", sig)


@pytest.mark.parametrize("bad", ["", "not-base58-0OIl", "12D3KooW", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_bad_peer_ids(bad: str) -> None:
    assert not is_peer_id(bad)
    with pytest.raises(MalformedMessage):
        public_from_peer_id(bad)


def test_identity_rejects_bad_seed() -> None:
    with pytest.raises(MalformedMessage):
        Identity(b"short")


# --- membership -----------------------------------------------------------------------------


@pytest.fixture
def root() -> Identity:
    return ident(10)


@pytest.fixture
def team(root: Identity) -> TeamInfo:
    return TeamInfo.create("t", root.public)


def test_root_issued_cert_verifies(root: Identity, team: TeamInfo) -> None:
    member = ident(11)
    cert = issue_certificate(root, team, member.peer_id, (ROLE_MEMBER,), NOW, DAY)
    got = parse_certificate(cert.packed(), team, NOW + 1)
    assert got.peer_id == member.peer_id
    assert got.roles == (ROLE_MEMBER,)
    assert got.expires == NOW + DAY
    assert got.issuer == root.peer_id
    assert not got.is_admin


def test_cert_for_another_team_is_rejected(root: Identity, team: TeamInfo) -> None:
    other_root = ident(20)
    other = TeamInfo.create("t", other_root.public)
    cert = issue_certificate(other_root, other, ident(11).peer_id, (ROLE_MEMBER,), NOW, DAY)
    with pytest.raises(NotAMember):
        parse_certificate(cert.packed(), team, NOW)
    # the other team's root signing a cert that names our team is not our root
    forged = issue_certificate(other_root, team, ident(11).peer_id, (ROLE_MEMBER,), NOW, DAY)
    with pytest.raises(BadSignature):
        parse_certificate(forged.packed(), team, NOW)


def test_expired_cert_is_rejected(root: Identity, team: TeamInfo) -> None:
    cert = issue_certificate(root, team, ident(11).peer_id, (ROLE_MEMBER,), NOW, DAY)
    with pytest.raises(NotAMember):
        parse_certificate(cert.packed(), team, NOW + DAY)
    roster = Roster(team)
    assert roster.merge([cert.packed()], [], NOW + DAY + 1) == (0, [])
    assert roster.merge([cert.packed()], [], NOW) == (1, [])
    assert roster.is_member(ident(11).peer_id, NOW)
    assert not roster.is_member(ident(11).peer_id, NOW + DAY)


def test_bridge_epoch_notice_verifies_and_only_admins_issue_it(
        root: Identity, team: TeamInfo) -> None:
    admin_node = ident(12).peer_id
    notice = issue_epoch_notice(root, team, 3, admin_node, NOW)
    got = parse_epoch_notice(notice.packed(), team, NOW + 10)
    assert (got.epoch, got.admin, got.issuer) == (3, admin_node, root.peer_id)
    # a member cannot announce an epoch (and send everyone to a node of its choosing)
    member = ident(11)
    member_cert = issue_certificate(root, team, member.peer_id, (ROLE_MEMBER,), NOW, DAY)
    forged = issue_epoch_notice(member, team, 4, member.peer_id, NOW, member_cert)
    with pytest.raises(BadSignature):
        parse_epoch_notice(forged.packed(), team, NOW)
    with pytest.raises(BadSignature):
        parse_epoch_notice(dataclasses.replace(notice, sig=flip(notice.sig, 3)).packed(),
                           team, NOW)
    other = TeamInfo.create("o", ident(20).public)
    with pytest.raises(NotAMember):
        parse_epoch_notice(issue_epoch_notice(ident(20), other, 1, admin_node, NOW).packed(),
                           team, NOW)
    with pytest.raises(MalformedMessage):
        parse_epoch_notice(issue_revocation(root, team, admin_node, NOW).packed(), team, NOW)


_TEAM = TeamInfo.create("t", ident(10).public)
_NOTICE = issue_epoch_notice(ident(10), _TEAM, 7, ident(12).peer_id, NOW).packed()


@settings(max_examples=300)
@given(st.integers(0, len(_NOTICE) - 1), st.integers(1, 255), st.binary(max_size=8))
def test_epoch_notice_mutations_raise_only_remote_errors(index: int, xor: int,
                                                         tail: bytes) -> None:
    data = bytearray(_NOTICE)
    data[index] ^= xor
    try:
        got = parse_epoch_notice(bytes(data) + tail, _TEAM, NOW)
    except (RemoteProtocolError, NotAMember):
        return
    assert got.epoch == 7  # a flip the decoder ignores cannot change what was signed


def test_forged_signature_is_rejected(root: Identity, team: TeamInfo) -> None:
    cert = issue_certificate(root, team, ident(11).peer_id, (ROLE_MEMBER,), NOW, DAY)
    bad_sig = dataclasses.replace(cert, sig=flip(cert.sig, 0))
    with pytest.raises(BadSignature):
        parse_certificate(bad_sig.packed(), team, NOW)
    # a changed body (a byte of the peer id) no longer matches the signature
    i = cert.body.index(ident(11).peer_id.encode()) + 20
    bad_body = dataclasses.replace(cert, body=cert.body[:i] + b"Z" + cert.body[i + 1:])
    with pytest.raises(RemoteProtocolError):
        parse_certificate(bad_body.packed(), team, NOW)
    # every single-byte flip of the packed cert fails (or decodes to the same cert)
    packed = cert.packed()
    for idx in range(len(packed)):
        try:
            got = parse_certificate(flip(packed, idx), team, NOW)
        except (RemoteProtocolError, NotAMember):
            continue
        assert got == cert


def test_self_signed_cert_by_a_member_is_rejected(root: Identity, team: TeamInfo) -> None:
    member = ident(11)
    cert = issue_certificate(member, team, ident(12).peer_id, (ROLE_ADMIN,), NOW, DAY)
    with pytest.raises(BadSignature):
        parse_certificate(cert.packed(), team, NOW)
    # a member (not admin) showing its own cert as chain cannot issue either
    member_cert = issue_certificate(root, team, member.peer_id, (ROLE_MEMBER,), NOW, DAY)
    chained = issue_certificate(member, team, ident(12).peer_id, (ROLE_MEMBER,), NOW, DAY,
                                issuer_cert=member_cert)
    with pytest.raises(BadSignature):
        parse_certificate(chained.packed(), team, NOW)
    # an admin with its root-issued cert can
    admin_cert = issue_certificate(root, team, member.peer_id, (ROLE_ADMIN,), NOW, DAY)
    ok = issue_certificate(member, team, ident(12).peer_id, (ROLE_MEMBER,), NOW, DAY,
                           issuer_cert=admin_cert)
    assert parse_certificate(ok.packed(), team, NOW).peer_id == ident(12).peer_id


def test_revocation_removes_membership_and_wins_over_later_cert(
        root: Identity, team: TeamInfo) -> None:
    peer = ident(11).peer_id
    cert = issue_certificate(root, team, peer, (ROLE_MEMBER,), NOW, DAY)
    roster = Roster(team)
    roster.merge([cert.packed()], [], NOW)
    assert roster.is_member(peer, NOW)
    rev = issue_revocation(root, team, peer, NOW + 10)
    assert roster.merge([], [rev.packed()], NOW + 10) == (0, [peer])
    assert not roster.is_member(peer, NOW + 10)
    assert roster.merge([], [rev.packed()], NOW + 11) == (0, [])  # already known
    later = issue_certificate(root, team, peer, (ROLE_MEMBER,), NOW + 100, DAY)
    assert roster.merge([later.packed()], [], NOW + 100) == (0, [])
    assert not roster.is_member(peer, NOW + 100)
    # arrival order does not matter: cert and revocation in one batch
    fresh = Roster(team)
    assert fresh.merge([later.packed()], [rev.packed()], NOW + 100) == (0, [peer])
    assert peer not in fresh.members(NOW + 100)
    # a revocation signed by someone else is ignored
    forged = issue_revocation(ident(11), team, ident(12).peer_id, NOW)
    r2 = Roster(team)
    r2.merge([issue_certificate(root, team, ident(12).peer_id, (ROLE_MEMBER,), NOW,
                                DAY).packed()], [forged.packed()], NOW)
    assert r2.is_member(ident(12).peer_id, NOW)


def test_roster_merge_skips_garbage(root: Identity, team: TeamInfo) -> None:
    good = issue_certificate(root, team, ident(11).peer_id, (ROLE_MEMBER,), NOW, DAY)
    roster = Roster(team)
    added, revoked = roster.merge([b"", b"\xc1", wire.pack({"t": "x", "v": 1}), good.packed()],
                                  [b"junk", wire.pack({"t": "signed_revoke", "v": 1})], NOW)
    assert (added, revoked) == (1, [])
    certs, revs = roster.export()
    assert certs == [good.packed()]
    assert revs == []


def test_invite_round_trip_and_damage(root: Identity, team: TeamInfo) -> None:
    inv = Invite(team, ident(1).peer_id, ("/ip4/127.0.0.1/tcp/4001/p2p/" + ident(1).peer_id,),
                 bytes([9]) * 32, NOW + 3600)
    text = inv.encode()
    assert text.startswith("tminv1.")
    assert Invite.decode(text) == inv
    assert Invite.decode("  " + text + "\n") == inv
    assert inv.enroll_peer_id == Identity(bytes([9]) * 32).peer_id
    for damaged in (text[:-10], text[: len(text) // 2], "tminv1.", "tminv1.!!!!",
                    text.replace("tminv1.", "tminv1.A", 1), "tminv2." + text[7:], "hello"):
        with pytest.raises(InviteError):
            Invite.decode(damaged)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_invite_decode_fuzz(text: str) -> None:
    try:
        Invite.decode("tminv1." + text)
    except InviteError:
        pass


def test_team_id_is_bound_to_root() -> None:
    team = TeamInfo.create("t", ident(10).public)
    team.check()
    with pytest.raises(MalformedMessage):
        TeamInfo(team.team_id, "t", ident(11).public).check()
    with pytest.raises(MalformedMessage):
        TeamInfo.from_dict({"id": team.team_id, "name": "t", "root": ident(11).public.hex()})


def test_enroll_request_proof(team: TeamInfo) -> None:
    real, enroll_key = ident(11), ident(12)
    req = enroll_request(real, enroll_key.peer_id, team.team_id)
    assert check_enroll_request(req, enroll_key.peer_id, team.team_id) == real.peer_id
    with pytest.raises(BadSignature):
        check_enroll_request(req, ident(13).peer_id, team.team_id)  # another invite key
    with pytest.raises(BadSignature):
        check_enroll_request(req, enroll_key.peer_id, "tmother")  # another team
    m = wire.unpack(req)
    m["peer"] = ident(14).peer_id  # claiming someone else's identity
    with pytest.raises(BadSignature):
        check_enroll_request(wire.pack(m), enroll_key.peer_id, team.team_id)
    with pytest.raises(MalformedMessage):
        check_enroll_request(wire.pack({"t": "cert", "v": 1}), enroll_key.peer_id, team.team_id)


# --- capability ads -------------------------------------------------------------------------


def make_ad(who: Identity, team: TeamInfo, seq: int = 1, ttl_ms: int = 15_000,
            cert: bytes = b"cert", **kw: object) -> CapabilityAd:
    fields: dict[str, object] = dict(
        peer_id=who.peer_id, team_id=team.team_id,
        addrs=("/ip4/127.0.0.1/tcp/1/p2p/" + who.peer_id,), cores=4, slots=2, free_slots=1,
        memory_bytes=8 << 30, gpus=(), kinds={"hash.sha256": "1"}, queue=0, cost=1.5,
        storage=("local",), software="0.1.0", seq=seq, ttl_ms=ttl_ms, cert=cert, pull=False)
    fields.update(kw)
    return CapabilityAd(**fields)  # type: ignore[arg-type]


def test_ad_seal_open_round_trip(team: TeamInfo) -> None:
    me = ident(11)
    ad = make_ad(me, team)
    assert open_ad(ad.sealed(me)) == ad
    pull = make_ad(me, team, addrs=(), pull=True)
    assert open_ad(pull.sealed(me)) == pull


def test_ad_signed_by_another_peer_is_rejected(team: TeamInfo) -> None:
    me, other = ident(11), ident(12)
    ad = make_ad(me, team)
    with pytest.raises(MalformedMessage):
        ad.sealed(other)  # refuses to sign for someone else
    # hand-built: other signs an ad naming me
    from teammesh.protocols.capability import DOMAIN_CAP
    from teammesh.protocols.envelope import seal

    forged = seal(other, DOMAIN_CAP, ad.to_wire())
    with pytest.raises(MalformedMessage):
        open_ad(forged)
    # a sealed ad whose signature is damaged
    sealed = ad.sealed(me)
    outer = wire.unpack(sealed)
    outer["sig"] = flip(outer["sig"], 5)
    with pytest.raises(BadSignature):
        open_ad(wire.pack(outer))
    # right signer, wrong domain
    wrong_domain = seal(me, "result", ad.to_wire())
    with pytest.raises(MalformedMessage):
        open_ad(wrong_domain)
    outer = wire.unpack(sealed)
    outer["d"] = "result"
    with pytest.raises(RemoteProtocolError):
        open_ad(wire.pack(outer))


@pytest.mark.parametrize("bad", [
    {"ttl_ms": 0}, {"ttl_ms": 3_600_001}, {"slots": -1}, {"free_slots": -1},
    {"kinds": {f"k{i}": "1" for i in range(257)}},
])
def test_ad_field_limits(team: TeamInfo, bad: dict[str, object]) -> None:
    me = ident(11)
    with pytest.raises(MalformedMessage):
        open_ad(make_ad(me, team, **bad).sealed(me))


def test_peer_table_keeps_newest_seq_and_expires_on_receiver_clock(team: TeamInfo) -> None:
    a, b = ident(11), ident(12)
    table = PeerTable()
    assert table.update(make_ad(a, team, seq=5, ttl_ms=10_000), now=100.0)
    assert not table.update(make_ad(a, team, seq=4, ttl_ms=10_000), now=101.0)  # older
    assert not table.update(make_ad(a, team, seq=5, ttl_ms=10_000), now=101.0)  # same
    assert table.get(a.peer_id, 101.0).ad.seq == 5
    assert table.update(make_ad(a, team, seq=6, ttl_ms=10_000), now=102.0)
    entry = table.get(a.peer_id, 102.0)
    assert entry.ad.seq == 6
    assert entry.received == 102.0
    assert entry.expires == 112.0
    table.update(make_ad(b, team, seq=1, ttl_ms=1_000), now=102.0)
    assert {e.ad.peer_id for e in table.live(102.5)} == {a.peer_id, b.peer_id}
    # expiry counts from when *we* received the ad, whatever the sender's clock says
    assert table.expire(103.0) == [b.peer_id]
    assert table.get(b.peer_id, 103.0) is None
    assert table.get(a.peer_id, 111.9) is not None
    assert table.get(a.peer_id, 112.0) is None
    assert [e.ad.peer_id for e in table.live(111.0)] == [a.peer_id]
    assert table.expire(112.0) == [a.peer_id]
    assert table.entries == {}
    # an expired entry is replaced even by a lower seq (a node restarted with a wrong clock)
    table.update(make_ad(a, team, seq=9, ttl_ms=1_000), now=200.0)
    assert table.update(make_ad(a, team, seq=3, ttl_ms=1_000), now=201.5)
    table.remove(a.peer_id)
    assert table.get(a.peer_id, 201.5) is None
    json = make_ad(a, team).to_wire()
    assert json["peer"] == a.peer_id


def test_a_relayed_ad_lives_ttl_from_when_the_relay_heard_it(team: TeamInfo) -> None:
    a = ident(11)
    table = PeerTable()
    # heard 4 s ago by the peer that synced it to us: 6 s left of a 10 s ttl
    assert table.update(make_ad(a, team, seq=5, ttl_ms=10_000), now=100.0, age=4.0)
    entry = table.get(a.peer_id, 100.0)
    assert (entry.received, entry.expires) == (96.0, 106.0)
    assert table.get(a.peer_id, 106.0) is None
    # an ad the relay held for longer than its ttl is already gone; a negative age is 0
    assert not table.update(make_ad(a, team, seq=6, ttl_ms=10_000), now=100.0, age=10.0)
    assert table.update(make_ad(a, team, seq=7, ttl_ms=10_000), now=100.0, age=-50.0)
    assert table.get(a.peer_id, 100.0).expires == 110.0


@settings(max_examples=500)
@given(st.binary(max_size=1024))
def test_open_ad_fuzz_bytes(data: bytes) -> None:
    try:
        open_ad(data)
    except RemoteProtocolError:
        pass


_SEALED = make_ad(ident(11), TeamInfo.create("t", ident(10).public)).sealed(ident(11))


@settings(max_examples=500)
@given(st.integers(0, len(_SEALED) - 1), st.integers(1, 255), st.integers(0, 64))
def test_open_ad_fuzz_mutations(index: int, xor: int, cut: int) -> None:
    data = bytearray(_SEALED)
    data[index] ^= xor
    for candidate in (bytes(data), bytes(data[: len(data) - cut])):
        try:
            open_ad(candidate)
        except RemoteProtocolError:
            pass


def _ad_field_values() -> st.SearchStrategy[object]:
    return (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=20) | st.binary(max_size=20)
            | st.lists(st.text(max_size=5), max_size=3)
            | st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(),
                              max_size=3))


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(list(make_ad(ident(11), TeamInfo.create(
    "t", ident(10).public)).to_wire())), _ad_field_values(), max_size=6))
def test_open_ad_fuzz_fields_signed_by_the_right_peer(overrides: dict[str, object]) -> None:
    """Well-signed ads with arbitrary field values: decoded or rejected, nothing else."""
    from teammesh.protocols.capability import DOMAIN_CAP
    from teammesh.protocols.envelope import seal

    me = ident(11)
    body = make_ad(me, TeamInfo.create("t", ident(10).public)).to_wire()
    body.update(overrides)
    try:
        data = seal(me, DOMAIN_CAP, body)
    except LocalProtocolError:
        return
    try:
        open_ad(data)
    except RemoteProtocolError:
        pass


def test_hypothesis_properties_run_without_a_deadline() -> None:
    # tests/conftest.py loads a profile with deadline=None by default: a slow example on a
    # loaded machine is not a failure of the decoder. Every @given here, with or without
    # its own @settings, must inherit it.
    assert settings.default.deadline is None
    props = [f for f in globals().values() if hasattr(f, "hypothesis")]
    assert len(props) >= 8
    for f in props:
        assert f._hypothesis_internal_use_settings.deadline is None, f.__name__
