#!/usr/bin/env python3
"""kiln's test EC2 API server: moto's EC2 in server mode, plus kiln's extensions.

Runs moto's werkzeug app in-process on 127.0.0.1 and wraps it in a WSGI
middleware that adds (see README.md for the full contract):

  * delayed state transitions for instances and images (moto flips them
    instantly), configurable with --delay-* flags or POST /_kiln/delays;
  * RunInstances / CopyImage ClientToken idempotency;
  * InvalidAMIName.Duplicate for CreateImage / CopyImage / RegisterImage;
  * DependencyViolation for DeleteSecurityGroup while a non-terminated
    instance uses the group;
  * fault injection (AWS-style XML errors, latency), call accounting,
    image catalog loading, reset - all over a JSON API under /_kiln/.

Usage: server.py [--port N] [--port-file FILE] [--delay-boot S] ...
Only talks to loopback. Dummy credentials are fine: moto does not check
signatures; it reads the region (and nothing else) from the SigV4 scope.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape as xml_escape

CONTROL_PREFIX = "/_kiln/"
DELAY_KINDS = ("boot", "stop", "terminate", "image", "copy")

# HTTP status AWS uses for an error code, when a fault does not say.
DEFAULT_STATUS = {
    "RequestLimitExceeded": 503,
    "Throttling": 400,
    "InternalError": 500,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
    "Unavailable": 503,
    "InsufficientInstanceCapacity": 500,
}
DEFAULT_MESSAGE = {
    "RequestLimitExceeded": "Request limit exceeded.",
    "InternalError": "An internal error has occurred",
    "ServiceUnavailable": "The service is unavailable. Try again later.",
    "Unavailable": "The server is overloaded and can't handle the request.",
    "InsufficientInstanceCapacity": (
        "We currently do not have sufficient capacity in the Availability Zone you requested."
    ),
    "UnauthorizedOperation": "You are not authorized to perform this operation.",
}

_CRED_RE = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request")
_CODE_RE = re.compile(rb"<Code>([^<]+)</Code>")


def log(msg: str) -> None:
    ts = datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    sys.stderr.write(f"{ts} {msg}\n")
    sys.stderr.flush()


def ec2_error_body(code: str, message: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{xml_escape(code)}</Code>"
        f"<Message>{xml_escape(message)}</Message></Error></Errors>"
        f"<RequestID>{request_id}</RequestID></Response>"
    ).encode()


class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def public_faults() -> list[dict[str, Any]]:
    """The faults as the control API shows them (without their generators)."""
    return [{k: v for k, v in f.items() if k != "rng"} for f in KILN.faults]


# --------------------------------------------------------------------- state
class Kiln:
    """All of the extension's mutable state. One per process."""

    def __init__(self, delays: dict[str, float], account_id: str):
        self.initial_delays = dict(delays)
        self.authorized_keys: str | None = None
        self.delays = dict(delays)
        self.account_id = account_id
        # One lock around every call into moto: moto's models are not
        # thread-safe, and check-then-create (ClientToken, duplicate AMI
        # names) must be atomic. Latency injection sleeps outside it.
        self.moto_lock = threading.RLock()
        self.lock = threading.Lock()  # faults, counters
        self.faults: list[dict[str, Any]] = []
        self.fault_seq = 0
        self.calls: dict[str, Any] = {}
        self.call_log: deque[dict[str, Any]] = deque(maxlen=10000)
        self.call_seq = 0
        self.idempotency: dict[tuple[str, str, str, str], tuple[str, str]] = {}

    def delay(self, kind: str) -> float:
        return float(self.delays.get(kind, 0) or 0)

    def reset_calls(self) -> None:
        self.calls = {}
        self.call_log.clear()

    # -- faults
    def take_fault(self, action: str, region: str) -> dict[str, Any] | None:
        with self.lock:
            for f in self.faults:
                if f["action"] not in ("*", action):
                    continue
                if f.get("region") and f["region"] != region:
                    continue
                if f["skip"] > 0:
                    f["skip"] -= 1
                    continue
                if f["remaining"] == 0:
                    continue
                # A fault with a probability hits a matching call only when its own
                # seeded generator says so: a chaos run is replayed by its seed.
                if f["rng"] is not None and f["rng"].random() >= f["probability"]:
                    continue
                if f["remaining"] > 0:
                    f["remaining"] -= 1
                f["hits"] += 1
                hit = {k: v for k, v in f.items() if k != "rng"}
                self.faults = [x for x in self.faults if x["remaining"] != 0]
                return hit
        return None

    # -- accounting
    def record(self, action: str, region: str, outcome: str, status: int,
               injected: bool, ms: float) -> None:
        with self.lock:
            a = self.calls.setdefault(
                action, {"total": 0, "ok": 0, "errors": {}, "injected": 0, "regions": {}}
            )
            a["total"] += 1
            a["regions"][region] = a["regions"].get(region, 0) + 1
            if outcome == "ok":
                a["ok"] += 1
            else:
                a["errors"][outcome] = a["errors"].get(outcome, 0) + 1
            if injected:
                a["injected"] += 1
            self.call_seq += 1
            self.call_log.append({
                "seq": self.call_seq, "t": round(time.time(), 3), "action": action,
                "region": region, "outcome": outcome, "status": status,
                "injected": injected, "ms": round(ms, 1),
            })

    def calls_snapshot(self, with_log: bool) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {
                "total": sum(a["total"] for a in self.calls.values()),
                "actions": copy.deepcopy(self.calls),
            }
            if with_log:
                out["log"] = list(self.call_log)
            return out


KILN: Kiln  # set in main()


# ------------------------------------------------------------ moto patches
def install_patches() -> None:
    """Monkeypatch moto's EC2 models/responses. Class-level, so they survive
    moto's reset (which re-creates backends, not classes)."""
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import DependencyViolationError, EC2ClientError
    from moto.ec2.models.amis import Ami, AmiBackend
    from moto.ec2.models.elastic_block_store import Snapshot
    from moto.ec2.models.instances import Instance, InstanceBackend, InstanceState
    from moto.ec2.models.security_groups import SecurityGroupBackend
    from moto.ec2.responses.amis import AmisResponse
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore
    from moto.ec2.responses.instances import InstanceResponse
    from moto.ec2.responses.key_pairs import KeyPairs

    now = time.monotonic

    # ---- instances: a virtual state overlays moto's (instant) one ----------
    def vstate(inst: Any) -> Any:
        t = inst.__dict__.get("_kiln_transition")
        if t is not None and now() < t[2]:
            return InstanceState(t[0], t[1])
        return inst._state

    def set_transition(inst: Any, name: str, code: int, kind: str) -> None:
        d = KILN.delay(kind)
        inst.__dict__["_kiln_transition"] = (name, code, now() + d) if d > 0 else None

    Instance.instance_state = property(vstate)
    Instance.state = property(lambda self: vstate(self).name)
    Instance.state_code = property(lambda self: vstate(self).code)
    Instance.is_running = lambda self: vstate(self).name == "running"

    def applies(self: Any, filters: Any) -> bool:
        for f in filters or []:
            vs = vstate(self)
            if f["name"] == "instance-state-name" and vs.name not in f["values"]:
                return False
            if f["name"] == "instance-state-code" and str(vs.code) not in f["values"]:
                return False
        return True

    Instance.applies = applies

    # No public IP/DNS while pending, like AWS.
    for attr in ("public_ip", "public_ip_address", "public_dns_name"):
        orig_prop = getattr(Instance, attr)

        def make(orig_prop: Any) -> property:
            def get(self: Any) -> Any:
                if vstate(self).name == "pending":
                    return None
                return orig_prop.fget(self)
            return property(get)

        setattr(Instance, attr, make(orig_prop))

    orig_start, orig_stop, orig_terminate = Instance.start, Instance.stop, Instance.terminate

    def start(self: Any) -> Any:
        prev = copy.copy(vstate(self))
        orig_start(self)
        if prev.name != "running":
            set_transition(self, "pending", 0, "boot")
        return prev

    def stop(self: Any) -> Any:
        prev = copy.copy(vstate(self))
        orig_stop(self)
        if prev.name != "stopped":
            set_transition(self, "stopping", 64, "stop")
        return prev

    def terminate(self: Any) -> Any:
        prev = copy.copy(vstate(self))
        if prev.name == "terminated":
            return prev
        orig_terminate(self)
        set_transition(self, "shutting-down", 32, "terminate")
        return prev

    Instance.start, Instance.stop, Instance.terminate = start, stop, terminate

    orig_run = InstanceBackend.run_instances

    def run_instances(self: Any, *a: Any, **kw: Any) -> Any:
        reservation = orig_run(self, *a, **kw)
        for inst in reservation.instances:
            set_transition(inst, "pending", 0, "boot")
        return reservation

    InstanceBackend.run_instances = run_instances

    # ---- images / snapshots: pending until a deadline ----------------------
    def ami_state_get(self: Any) -> str:
        raw = self.__dict__.get("_kiln_state", "available")
        until = self.__dict__.get("_kiln_ready_at")
        if raw == "available" and until is not None and now() < until:
            return "pending"
        return raw

    def ami_state_set(self: Any, value: str) -> None:
        self.__dict__["_kiln_state"] = value

    Ami.state = property(ami_state_get, ami_state_set)

    def snap_status_get(self: Any) -> str:
        raw = self.__dict__.get("_kiln_status", "completed")
        until = self.__dict__.get("_kiln_ready_at")
        if raw == "completed" and until is not None and now() < until:
            return "pending"
        return raw

    def snap_status_set(self: Any, value: str) -> None:
        self.__dict__["_kiln_status"] = value

    Snapshot.status = property(snap_status_get, snap_status_set)
    Snapshot.progress = property(lambda self: "100%" if self.status == "completed" else "0%")

    # Image block device mappings: report the snapshot's encryption.
    orig_bdm = Ami.block_device_mappings

    def ami_bdm(self: Any) -> Any:
        out = orig_bdm.fget(self)
        snap = getattr(self, "ebs_snapshot", None)
        if snap is not None:
            for m in out:
                m["Ebs"]["Encrypted"] = bool(snap.encrypted)
                if snap.kms_key_id:
                    m["Ebs"]["KmsKeyId"] = snap.kms_key_id
        return out

    Ami.block_device_mappings = property(ami_bdm)

    def mark_pending(ami: Any, kind: str) -> None:
        d = KILN.delay(kind)
        if d > 0:
            until = now() + d
            ami.__dict__["_kiln_ready_at"] = until
            snap = getattr(ami, "ebs_snapshot", None)
            if snap is not None:
                snap.__dict__["_kiln_ready_at"] = until

    def check_duplicate_name(backend: Any, name: str | None) -> None:
        if not name:
            return
        for ami in list(backend.amis.values()):
            if ami.name == name and ami.owner_id == backend.account_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by AMI {ami.id}",
                )

    orig_create_image = AmiBackend.create_image

    def create_image(self: Any, instance_id: str, name: str, description: str,
                     tag_specifications: list[dict[str, Any]]) -> Any:
        self.get_instance(instance_id)  # InvalidInstanceID.NotFound first, like AWS
        check_duplicate_name(self, name)
        specs, snap_tags = [], []
        for spec in tag_specifications or []:
            if spec.get("ResourceType") == "snapshot":
                snap_tags += spec.get("Tags", [])  # moto raises NotImplementedError
            else:
                specs.append(spec)
        ami = orig_create_image(self, instance_id, name, description, tag_specifications=specs)
        for t in snap_tags:
            ami.ebs_snapshot.add_tag(t["Key"], t.get("Value", ""))
        mark_pending(ami, "image")
        return ami

    AmiBackend.create_image = create_image

    orig_copy_image = AmiBackend.copy_image

    def copy_image(self: Any, source_image_id: str, source_region: str,
                   name: str | None = None, description: str | None = None) -> Any:
        from moto.ec2.models import ec2_backends

        if source_region not in ec2_backends[self.account_id].regions:
            raise EC2ClientError(
                "InvalidParameterValue", f"Invalid value '{source_region}' for SourceRegion"
            )
        src = ec2_backends[self.account_id][source_region].describe_images(
            ami_ids=[source_image_id]
        )
        if not src:
            raise EC2ClientError(
                "InvalidAMIID.NotFound", f"The image id '[{source_image_id}]' does not exist"
            )
        check_duplicate_name(self, name or src[0].name)
        ami = orig_copy_image(self, source_image_id, source_region, name, description)
        mark_pending(ami, "copy")
        return ami

    AmiBackend.copy_image = copy_image

    orig_register_image = AmiBackend.register_image

    def register_image(self: Any, name: str | None = None,
                       description: str | None = None) -> Any:
        check_duplicate_name(self, name)
        ami = orig_register_image(self, name=name, description=description)
        mark_pending(ami, "image")
        return ami

    AmiBackend.register_image = register_image

    # ---- ClientToken idempotency -------------------------------------------
    def param_hash(resp: Any) -> str:
        items = sorted(
            (k, tuple(v) if isinstance(v, list) else (v,))
            for k, v in resp.querystring.items()
            if k not in ("ClientToken", "DryRun")
        )
        return hashlib.sha256(repr(items).encode()).hexdigest()

    def idempotent(resp: Any, action: str, call: Any, replay: Any) -> Any:
        token = resp._get_param("ClientToken")
        if not token or resp._get_param("DryRun"):
            return call()[0]
        key = (resp.current_account, resp.region, action, token)
        h = param_hash(resp)
        seen = KILN.idempotency.get(key)
        if seen is not None:
            if seen[0] != h:
                raise EC2ClientError(
                    "IdempotentParameterMismatch",
                    "Arguments on this idempotent request are inconsistent with "
                    "arguments used in previous request(s).",
                )
            out = replay(seen[1])
            if out is not None:
                return out
        result, ref = call()
        KILN.idempotency[key] = (h, ref)
        return result

    def authorize_key(backend: Any, key_name: Any) -> None:
        # What cloud-init does on a real instance: the launch key may log in.
        # Here "the instance" is the test sshd, which reads this file.
        path = KILN.authorized_keys
        if not path or not key_name:
            return
        kp = getattr(backend, "key_pairs", {}).get(key_name)
        if kp is None:
            return
        line = kp.public_key.strip()
        try:
            with open(path, encoding="utf-8") as f:
                if line in (l.strip() for l in f):
                    return
        except FileNotFoundError:
            pass
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    orig_run_response = InstanceResponse.run_instances

    def run_instances_response(self: Any) -> Any:
        def call() -> tuple[Any, str]:
            res = orig_run_response(self)
            authorize_key(self.ec2_backend, self._get_param("KeyName"))
            return res, res.result.id

        def replay(rid: str) -> Any:
            r = self.ec2_backend.reservations.get(rid)
            return ActionResult(r) if r is not None else None

        return idempotent(self, "RunInstances", call, replay)

    InstanceResponse.run_instances = run_instances_response

    def copy_image_response(self: Any) -> Any:
        source_image_id = self._get_param("SourceImageId")
        source_region = self._get_param("SourceRegion")
        name = self._get_param("Name")
        description = self._get_param("Description")
        encrypted = self._get_bool_param("Encrypted", False)
        kms_key_id = self._get_param("KmsKeyId")
        copy_tags = self._get_bool_param("CopyImageTags", False)
        tag_specs = self._get_param("TagSpecifications", [])
        self.error_on_dryrun()

        def call() -> tuple[Any, str]:
            image = self.ec2_backend.copy_image(source_image_id, source_region, name, description)
            snap = image.ebs_snapshot
            if encrypted or kms_key_id:
                snap.encrypted = True
                snap.kms_key_id = kms_key_id
            if copy_tags:
                from moto.ec2.models import ec2_backends

                src = ec2_backends[self.current_account][source_region].describe_images(
                    ami_ids=[source_image_id])[0]
                image.add_tags({t["key"]: t["value"] for t in src.get_tags()
                                if not t["key"].startswith("aws:")})
            for spec in tag_specs:
                target = {"image": image, "snapshot": snap}.get(spec.get("ResourceType"))
                if target is None:
                    raise EC2ClientError(
                        "InvalidParameterValue",
                        f"'{spec.get('ResourceType')}' is not a valid taggable resource type "
                        "for this operation.",
                    )
                for t in spec.get("Tags", []):
                    target.add_tag(t["Key"], t.get("Value", ""))
            return ActionResult({"ImageId": image.id}), image.id

        return idempotent(self, "CopyImage", call, lambda iid: ActionResult({"ImageId": iid}))

    AmisResponse.copy_image = copy_image_response

    # ---- DescribeSnapshots: honour OwnerIds (moto ignores it) --------------
    orig_describe_snapshots = ElasticBlockStore.describe_snapshots

    def describe_snapshots(self: Any) -> Any:
        owners = self._get_param("OwnerIds", [])
        res = orig_describe_snapshots(self)
        if owners:
            owners = [self.current_account if o == "self" else o for o in owners]
            snaps = [s for s in res.result["Snapshots"] if s.owner_id in owners]
            res = ActionResult({"Snapshots": snaps})
        return res

    ElasticBlockStore.describe_snapshots = describe_snapshots

    # ---- DeleteKeyPair by KeyPairId (moto reads only KeyName) --------------
    orig_delete_key_pair = KeyPairs.delete_key_pair

    def delete_key_pair(self: Any) -> Any:
        kid = self._get_param("KeyPairId")
        if not kid or self._get_param("KeyName"):
            return orig_delete_key_pair(self)
        self.error_on_dryrun()
        pairs = self.ec2_backend.key_pairs
        name = next((n for n, kp in pairs.items() if kp.id == kid), None)
        if name is not None:
            pairs.pop(name)
        # Like a name that does not exist: done.
        return ActionResult({"Return": True, "KeyPairId": kid})

    KeyPairs.delete_key_pair = delete_key_pair

    # ---- DeleteSecurityGroup: DependencyViolation while in use -------------
    orig_delete_sg = SecurityGroupBackend.delete_security_group

    def delete_security_group(self: Any, name: str | None = None,
                              group_id: str | None = None) -> None:
        gid = group_id
        if not gid and name:
            g = self.get_security_group_by_name_or_id(name)
            gid = g.id if g is not None else None
        if gid:
            for inst in self.all_instances():
                if inst.state == "terminated":
                    continue
                ids = {getattr(g, "id", g) for g in inst.security_groups or []}
                for nic in inst.nics.values():
                    ids |= {getattr(g, "id", g) for g in getattr(nic, "_group_set", [])}
                if gid in ids:
                    raise DependencyViolationError(f"resource {gid} has a dependent object")
        return orig_delete_sg(self, name=name, group_id=group_id)

    SecurityGroupBackend.delete_security_group = delete_security_group


# ------------------------------------------------------------ image loading
def load_images(body: Any, default_region: str) -> list[dict[str, str]]:
    from moto.core.parse import default_timestamp_parser
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id

    if isinstance(body, dict):
        default_region = body.get("region", default_region)
        items = body.get("images")
    else:
        items = body
    if not isinstance(items, list):
        raise ControlError(400, "body must be a list of images or {\"region\":..,\"images\":[..]}")
    out = []
    for item in items:
        if not isinstance(item, dict) or not item.get("name"):
            raise ControlError(400, f"each image needs a name: {item!r}")
        region = item.get("region", default_region)
        account = item.get("account", KILN.account_id)
        if region not in ec2_backends[account].regions:
            raise ControlError(400, f"unknown region {region!r}")
        backend = ec2_backends[account][region]
        owner = str(item.get("owner", account))
        for ami in list(backend.amis.values()):
            if ami.name == item["name"] and ami.owner_id == owner:
                raise ControlError(
                    409, f"AMI name {item['name']} is already in use by AMI {ami.id} in {region}"
                )
        created = item.get("creation_date")
        creation_date = default_timestamp_parser(created) if created else None
        ami_id = item.get("image_id") or random_ami_id()
        if ami_id in backend.amis:
            raise ControlError(409, f"image id {ami_id} already exists in {region}")
        tags = item.get("tags") or {}
        if isinstance(tags, list):
            tags = {t["Key"]: t.get("Value", "") for t in tags}
        ami = Ami(
            backend,
            ami_id,
            name=item["name"],
            description=item.get("description"),
            owner_id=owner,
            owner_alias=item.get("owner_alias"),
            public=bool(item.get("public", False)),
            virtualization_type=item.get("virtualization_type", "hvm"),
            architecture=item.get("architecture", "x86_64"),
            state=item.get("state", "available"),
            creation_date=creation_date,
            platform=item.get("platform"),
            hypervisor=item.get("hypervisor", "xen"),
            root_device_type=item.get("root_device_type", "ebs"),
            root_device_name=item.get("root_device_name", "/dev/xvda"),
            region_name=region + "a",
            boot_mode=item.get("boot_mode", "uefi-preferred"),
            tags=tags,
        )
        if item.get("ena_support") is not None:
            ami.ena_support = bool(item["ena_support"])
        backend.amis[ami_id] = ami
        out.append({"name": ami.name, "image_id": ami_id, "region": region,
                    "owner": owner, "snapshot_id": ami.ebs_snapshot.id})
    return out


def set_image_state(body: dict[str, Any]) -> dict[str, Any]:
    from moto.ec2.models import ec2_backends

    region = body.get("region", "us-east-1")
    backend = ec2_backends[body.get("account", KILN.account_id)][region]
    ami = backend.amis.get(body.get("image_id"))
    if ami is None:
        raise ControlError(404, f"no image {body.get('image_id')!r} in {region}")
    ami.state = body.get("state", "failed")
    ami.__dict__.pop("_kiln_ready_at", None)
    if body.get("reason"):
        ami.state_reason = {"Code": body.get("reason_code", "Server.InternalError"),
                            "Message": body["reason"]}
    return {"image_id": ami.id, "state": ami.state}


def set_instance_state(body: dict[str, Any]) -> dict[str, Any]:
    """Out-of-band instance events: 'terminated' (e.g. spot reclaim/host
    failure: goes through shutting-down with the terminate delay) or
    'stopped'."""
    from moto.ec2.models import ec2_backends

    region = body.get("region", "us-east-1")
    backend = ec2_backends[body.get("account", KILN.account_id)][region]
    inst = backend.get_instance(body.get("instance_id"))
    want = body.get("state", "terminated")
    if want == "terminated":
        inst.terminate()
    elif want == "stopped":
        inst.stop()
    else:
        raise ControlError(400, "state must be 'terminated' or 'stopped'")
    reason = body.get("reason")
    if reason:
        from moto.ec2.models.instances import StateReason

        inst.state_reason = StateReason(reason, body.get("reason_code", "Server.InternalError"))
    return {"instance_id": inst.id, "state": inst.state}


# ----------------------------------------------------------------- the app
class KilnApp:
    def __init__(self, moto_app: Any, port_ref: list[int]):
        self.moto_app = moto_app
        self.port_ref = port_ref

    # -- helpers
    @staticmethod
    def _read_body(environ: dict[str, Any]) -> bytes:
        try:
            n = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            n = 0
        body = environ["wsgi.input"].read(n) if n > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body

    @staticmethod
    def _json(start_response: Any, status: int, obj: Any) -> list[bytes]:
        data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict",
                  500: "Internal Server Error"}.get(status, "")
        start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(data)))])
        return [data]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX) or path == CONTROL_PREFIX.rstrip("/"):
            try:
                return self._json(start_response, 200, self.control(environ, path))
            except ControlError as e:
                return self._json(start_response, e.status, {"error": e.message})
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                return self._json(start_response, 500, {"error": repr(e)})
        return self.aws(environ, start_response)

    # -- control API
    def control(self, environ: dict[str, Any], path: str) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        raw = self._read_body(environ)
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise ControlError(400, f"body is not JSON: {e}") from e
        route = path[len(CONTROL_PREFIX):].strip("/")

        if route == "health" and method == "GET":
            from moto import __version__ as moto_version

            return {"ok": True, "port": self.port_ref[0], "moto": moto_version,
                    "account_id": KILN.account_id, "pid": os.getpid()}

        if route == "delays":
            if method == "POST":
                if not isinstance(body, dict):
                    raise ControlError(400, "body must be an object like {\"boot\": 3}")
                for k, v in body.items():
                    if k not in DELAY_KINDS:
                        raise ControlError(400, f"unknown delay {k!r}; known: {DELAY_KINDS}")
                    try:
                        v = float(v)
                    except (TypeError, ValueError) as e:
                        raise ControlError(400, f"delay {k} must be a number") from e
                    if v < 0:
                        raise ControlError(400, f"delay {k} must be >= 0")
                with KILN.lock:
                    KILN.delays.update({k: float(v) for k, v in body.items()})
            elif method == "DELETE":
                with KILN.lock:
                    KILN.delays = {k: 0.0 for k in DELAY_KINDS}
            elif method != "GET":
                raise ControlError(400, f"{method} not supported on /_kiln/delays")
            return dict(KILN.delays)

        if route == "faults":
            if method == "POST":
                specs = body if isinstance(body, list) else [body]
                added = []
                for spec in specs:
                    added.append(self._add_fault(spec))
                return {"added": added, "faults": public_faults()}
            if method == "DELETE":
                with KILN.lock:
                    n = len(KILN.faults)
                    KILN.faults = []
                return {"cleared": n}
            if method == "GET":
                with KILN.lock:
                    return {"faults": public_faults()}
            raise ControlError(400, f"{method} not supported on /_kiln/faults")

        if route == "calls":
            if method == "GET":
                with_log = query.get("log", ["0"])[0] not in ("0", "", "false")
                snap = KILN.calls_snapshot(with_log)
                if query.get("reset", ["0"])[0] not in ("0", "", "false"):
                    with KILN.lock:
                        KILN.reset_calls()
                return snap
            if method == "DELETE":
                with KILN.lock:
                    KILN.reset_calls()
                return {"reset": True}
            raise ControlError(400, f"{method} not supported on /_kiln/calls")

        if route == "images" and method == "POST":
            region = query.get("region", ["us-east-1"])[0]
            with KILN.moto_lock:
                return {"images": load_images(body, region)}

        if route == "image-state" and method == "POST":
            with KILN.moto_lock:
                return set_image_state(body or {})

        if route == "instance-state" and method == "POST":
            with KILN.moto_lock:
                return set_instance_state(body or {})

        if route == "reset" and method == "POST":
            from moto.moto_api._internal.models import moto_api_backend

            with KILN.moto_lock, KILN.lock:
                moto_api_backend.reset()
                KILN.idempotency.clear()
                KILN.faults = []
                KILN.reset_calls()
                KILN.delays = dict(KILN.initial_delays)
            return {"reset": True, "delays": dict(KILN.delays)}

        raise ControlError(404, f"no control route {method} {path}")

    def _add_fault(self, spec: Any) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise ControlError(400, "a fault is an object")
        unknown = set(spec) - {"action", "count", "code", "status", "message",
                               "latency_ms", "region", "skip", "when", "probability",
                               "seed"}
        if unknown:
            raise ControlError(400, f"unknown fault fields: {sorted(unknown)}")
        action = spec.get("action")
        if not action or not isinstance(action, str):
            raise ControlError(400, "fault needs \"action\" (an EC2 Action or \"*\")")
        code = spec.get("code")
        latency = float(spec.get("latency_ms") or 0)
        if not code and latency <= 0:
            raise ControlError(400, "fault needs \"code\" and/or \"latency_ms\"")
        when = spec.get("when", "before")
        if when not in ("before", "after"):
            raise ControlError(400, "\"when\" is \"before\" (default) or \"after\"")
        if when == "after" and not code:
            raise ControlError(400, "\"when\": \"after\" needs a \"code\"")
        count = int(spec.get("count", 1))
        probability = spec.get("probability")
        if probability is not None:
            probability = float(probability)
            if not 0 < probability <= 1:
                raise ControlError(400, "\"probability\" is in (0, 1]")
        rng = random.Random(spec.get("seed")) if probability is not None else None
        with KILN.lock:
            KILN.fault_seq += 1
            f = {
                "id": KILN.fault_seq,
                "action": action,
                "count": count,
                "remaining": count if count > 0 else -1,  # <= 0: until cleared
                "code": code,
                "status": int(spec.get("status") or DEFAULT_STATUS.get(code or "", 400)),
                "message": spec.get("message") or DEFAULT_MESSAGE.get(code or "", f"Injected {code}"),
                "latency_ms": latency,
                "region": spec.get("region"),
                "skip": int(spec.get("skip", 0)),
                "when": when,
                "probability": probability,
                "seed": spec.get("seed"),
                "rng": rng,
                "hits": 0,
            }
            KILN.faults.append(f)
        return {k: v for k, v in f.items() if k != "rng"}

    # -- AWS requests
    def aws(self, environ: dict[str, Any], start_response: Any) -> Any:
        t0 = time.monotonic()
        auth = environ.get("HTTP_AUTHORIZATION", "")
        m = _CRED_RE.search(auth)
        region = m.group(3) if m else "us-east-1"
        body = self._read_body(environ)
        action = None
        ctype = environ.get("CONTENT_TYPE", "")
        if body and ctype.startswith("application/x-www-form-urlencoded"):
            action = parse_qs(body.decode("utf-8", "replace")).get("Action", [None])[0]
        if action is None and environ.get("QUERY_STRING"):
            action = parse_qs(environ["QUERY_STRING"]).get("Action", [None])[0]
        if action is None:  # not a query-protocol call: pass through untouched
            with KILN.moto_lock:
                return list(self.moto_app(environ, start_response))

        request_id = str(uuid.uuid4())
        if m and m.group(4) == "ec2" and region not in ec2_regions():
            # moto would raise KeyError (a 500); AWS says this:
            data = ec2_error_body(
                "AuthFailure",
                f"Credential should be scoped to a valid region, not '{region}'.", request_id)
            start_response("401 Unauthorized", [("Content-Type", "text/xml;charset=UTF-8"),
                                                ("Content-Length", str(len(data)))])
            KILN.record(action, region, "AuthFailure", 401, False, 0.0)
            return [data]
        fault = KILN.take_fault(action, region)
        if fault and fault["latency_ms"] > 0:
            time.sleep(fault["latency_ms"] / 1000.0)
        if fault and fault["code"] and fault["when"] == "before":
            return self._inject(fault, action, region, request_id, t0, start_response)

        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None  # we return the body as our iterable

        with KILN.moto_lock:
            try:
                chunks = b"".join(self.moto_app(environ, capture))
            except NotImplementedError as e:
                # not retryable, unlike InternalError: the SDK fails fast
                captured["status"], captured["headers"] = "400 Bad Request", []
                chunks = ec2_error_body(
                    "InvalidAction", f"kiln ec2server: moto does not implement {action} ({e})",
                    request_id)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                captured["status"], captured["headers"] = "500 Internal Server Error", []
                chunks = ec2_error_body("InternalError", f"kiln ec2server: {e!r}", request_id)

        if fault and fault["code"]:  # when == "after": the call happened, the reply is lost
            return self._inject(fault, action, region, request_id, t0, start_response)

        status = int(captured["status"].split()[0])
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        # moto's bodies all say request-id; give each response its own id
        rid = next((v for k, v in headers if k.lower() == "x-amzn-requestid"), None)
        if rid is None:
            rid = request_id
            headers.append(("x-amzn-RequestId", rid))
        chunks = chunks.replace(b">request-id</", f">{rid}</".encode(), 1)
        outcome = "ok"
        if status >= 400:
            cm = _CODE_RE.search(chunks)
            if cm:
                outcome = cm.group(1).decode()
            else:
                # moto crashed (HTML 500 page): give the SDK an EC2 error it can parse
                outcome = "InternalError"
                snippet = re.sub(rb"<[^>]+>", b" ", chunks)[:300].decode("utf-8", "replace")
                chunks = ec2_error_body(
                    "InternalError", "kiln ec2server (moto): " + " ".join(snippet.split()),
                    request_id)
                headers = [("Content-Type", "text/xml;charset=UTF-8")]
        headers.append(("Content-Length", str(len(chunks))))
        start_response(captured["status"], headers)
        ms = (time.monotonic() - t0) * 1000
        KILN.record(action, region, outcome, status, False, ms)
        if VERBOSE:
            log(f"{action} {region} {status} {outcome} {ms:.1f}ms")
        return [chunks]

    def _inject(self, fault: dict[str, Any], action: str, region: str, request_id: str,
                t0: float, start_response: Any) -> list[bytes]:
        data = ec2_error_body(fault["code"], fault["message"], request_id)
        status = fault["status"]
        start_response(f"{status} Injected", [
            ("Content-Type", "text/xml;charset=UTF-8"),
            ("Content-Length", str(len(data))),
            ("x-amzn-RequestId", request_id),
            ("Server", "AmazonEC2"),
        ])
        ms = (time.monotonic() - t0) * 1000
        KILN.record(action, region, fault["code"], status, True, ms)
        if VERBOSE:
            log(f"{action} {region} {status} {fault['code']} (injected #{fault['id']}"
                f", {fault['when']}) {ms:.1f}ms")
        return [data]


VERBOSE = True


_EC2_REGIONS: set[str] = set()


def ec2_regions() -> set[str]:
    if not _EC2_REGIONS:
        from moto.ec2.models import ec2_backends

        _EC2_REGIONS.update(ec2_backends[KILN.account_id].regions)
    return _EC2_REGIONS


def warm_up(moto_app: Any) -> None:
    """The first EC2 call loads botocore's EC2 model (~2 s); pay it before we
    say we are ready."""
    from werkzeug.test import Client

    client = Client(moto_app)
    auth = ("AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0")
    for action in ("DescribeRegions", "DescribeInstances", "DescribeImages"):
        r = client.post("/", data=f"Action={action}&Version=2016-11-15&Owner.1=self",
                        headers={"Authorization": auth,
                                 "Content-Type": "application/x-www-form-urlencoded"})
        if r.status_code != 200:
            raise RuntimeError(f"warm-up {action} failed: {r.status_code} {r.data[:300]!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    p.add_argument("--port-file", help="write the bound port here once ready")
    for k in DELAY_KINDS:
        p.add_argument(f"--delay-{k}", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--account-id", default=os.environ.get("MOTO_ACCOUNT_ID", "123456789012"),
                   help="account every request acts as (default 123456789012)")
    p.add_argument("--builtin-amis", action="store_true",
                   help="load moto's ~1300 built-in AMIs per region (slow DescribeImages)")
    p.add_argument("--validate-amis", action="store_true",
                   help="RunInstances fails with InvalidAMIID.NotFound for unknown images")
    p.add_argument("--validate-keypairs", action="store_true",
                   help="RunInstances fails with InvalidKeyPair.NotFound for unknown keys")
    p.add_argument("--quiet", action="store_true", help="no per-call log lines")
    p.add_argument("--authorized-keys", metavar="FILE",
                   help="append the public key of RunInstances' KeyName to FILE (cloud-init's "
                        "job), so the test sshd accepts the build's generated key")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("--host must be a loopback address")

    # moto reads these at import time.
    os.environ["MOTO_ACCOUNT_ID"] = args.account_id
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "true" if args.builtin_amis else "false"
    if args.validate_amis:
        os.environ["MOTO_ENABLE_AMI_VALIDATION"] = "true"
    if args.validate_keypairs:
        os.environ["MOTO_ENABLE_KEYPAIR_VALIDATION"] = "true"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    global KILN, VERBOSE
    VERBOSE = not args.quiet
    t0 = time.monotonic()
    KILN = Kiln({k: getattr(args, f"delay_{k}") for k in DELAY_KINDS}, args.account_id)
    KILN.authorized_keys = args.authorized_keys

    from werkzeug.serving import make_server

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )

    install_patches()
    moto_app = DomainDispatcherApplication(create_backend_app)
    warm_up(moto_app)
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()  # drop the warm-up's backends; modules stay loaded

    class Handler(MotoRequestHandler):
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            pass  # KilnApp logs EC2 calls itself

    port_ref = [0]
    server = make_server(args.host, args.port, KilnApp(moto_app, port_ref),
                         threaded=True, request_handler=Handler)
    port_ref[0] = server.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{port_ref[0]}\n")
        os.replace(tmp, args.port_file)
    log(f"kiln ec2server listening on http://{args.host}:{port_ref[0]} "
        f"(ready in {time.monotonic() - t0:.2f}s; delays {KILN.delays}; "
        f"account {args.account_id})")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        log("kiln ec2server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
