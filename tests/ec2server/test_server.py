"""Spec and smoke tests for kiln's test EC2 server (server.py), via boto3.

Run: bash tests/ec2server/test.sh        (sets up the venv, then pytest)
  or: <venv>/bin/python -m pytest tests/ec2server

Each session starts its own server on a free port (so tests may reset it
freely); set KILN_EC2_TEST_ENDPOINT to test an already running one instead
(its state will be reset!).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
ACCOUNT = "123456789012"


# ------------------------------------------------------------------ plumbing
@pytest.fixture(scope="session")
def endpoint(tmp_path_factory):
    ep = os.environ.get("KILN_EC2_TEST_ENDPOINT")
    if ep:
        yield ep.rstrip("/")
        return
    tmp = tmp_path_factory.mktemp("ec2server")
    port_file = Path(tmp, "port")
    log = open(Path(tmp, "ec2.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "--port", "0", "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start; log: {Path(tmp, 'ec2.log').read_text()}")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_file.read_text().strip()}"
    proc.terminate()
    proc.wait(10)
    log.close()


def ctl(endpoint, method, path, body=None):
    """Call the JSON control API; returns (status, parsed JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(autouse=True)
def reset(endpoint):
    status, _ = ctl(endpoint, "POST", "/_kiln/reset")
    assert status == 200


@pytest.fixture
def client(endpoint):
    def make(region="us-east-1", retries=1):
        return boto3.client(
            "ec2", region_name=region, endpoint_url=endpoint,
            aws_access_key_id="test", aws_secret_access_key="test",
            config=Config(retries={"total_max_attempts": retries, "mode": "standard"}),
        )
    return make


@pytest.fixture
def ec2(client):
    return client()


def err(excinfo):
    e = excinfo.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"], e["Error"]["Message"]


def run_one(ec2, **kw):
    kw.setdefault("ImageId", "ami-12c6146b")
    kw.setdefault("InstanceType", "t3.micro")
    r = ec2.run_instances(MinCount=1, MaxCount=1, **kw)
    return r["Instances"][0]["InstanceId"], r


def instance(ec2, iid):
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def image(ec2, ami):
    return ec2.describe_images(ImageIds=[ami])["Images"][0]


def wait_until(pred, timeout=10.0, step=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ------------------------------------------------------------------- basics
def test_health_and_regions(endpoint, ec2):
    status, h = ctl(endpoint, "GET", "/_kiln/health")
    assert status == 200 and h["ok"] and h["account_id"] == ACCOUNT
    names = {r["RegionName"] for r in ec2.describe_regions()["Regions"]}
    assert {"us-east-1", "eu-west-1", "us-west-2"} <= names


def test_dry_run_is_412_dry_run_operation(ec2):
    with pytest.raises(ClientError) as e:
        ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, DryRun=True)
    assert err(e)[:2] == ("DryRunOperation", 412)
    assert ec2.describe_instances()["Reservations"] == []


def test_unknown_control_route_is_404(endpoint):
    assert ctl(endpoint, "GET", "/_kiln/nope")[0] == 404


# -------------------------------------------------------- a. state delays
def test_default_transitions_are_immediate(ec2):
    iid, r = run_one(ec2)
    assert r["Instances"][0]["State"]["Name"] == "pending"  # RunInstances always says pending
    assert instance(ec2, iid)["State"]["Name"] == "running"
    ec2.stop_instances(InstanceIds=[iid])
    assert instance(ec2, iid)["State"]["Name"] == "stopped"
    ami = ec2.create_image(InstanceId=iid, Name="immediate")["ImageId"]
    assert image(ec2, ami)["State"] == "available"
    ec2.terminate_instances(InstanceIds=[iid])
    assert instance(ec2, iid)["State"]["Name"] == "terminated"


def test_boot_delay_pending_then_running(endpoint, ec2):
    assert ctl(endpoint, "POST", "/_kiln/delays", {"boot": 1.5})[0] == 200
    t0 = time.time()
    iid, _ = run_one(ec2)
    i = instance(ec2, iid)
    assert i["State"] == {"Code": 0, "Name": "pending"}
    assert "PublicIpAddress" not in i and not i.get("PublicDnsName")
    assert "PrivateIpAddress" in i
    # filters and DescribeInstanceStatus see the virtual state too
    pend = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending"]}])
    assert [x["InstanceId"] for r in pend["Reservations"] for x in r["Instances"]] == [iid]
    assert ec2.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"] == []
    st = ec2.describe_instance_status(InstanceIds=[iid], IncludeAllInstances=True)
    assert st["InstanceStatuses"][0]["InstanceState"]["Name"] == "pending"

    assert wait_until(lambda: instance(ec2, iid)["State"]["Name"] == "running", 5)
    assert time.time() - t0 >= 1.4
    i = instance(ec2, iid)
    assert i["State"]["Code"] == 16 and i["PublicIpAddress"]
    st = ec2.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"][0]
    assert st["InstanceStatus"]["Status"] == "ok" and st["SystemStatus"]["Status"] == "ok"


def test_stop_and_terminate_delays(endpoint, ec2):
    iid, _ = run_one(ec2)
    ctl(endpoint, "POST", "/_kiln/delays", {"stop": 1, "terminate": 1})
    r = ec2.stop_instances(InstanceIds=[iid])["StoppingInstances"][0]
    assert r["PreviousState"]["Name"] == "running" and r["CurrentState"]["Name"] == "stopping"
    assert instance(ec2, iid)["State"] == {"Code": 64, "Name": "stopping"}
    assert wait_until(lambda: instance(ec2, iid)["State"]["Name"] == "stopped", 5)

    r = ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert r["PreviousState"]["Name"] == "stopped" and r["CurrentState"]["Name"] == "shutting-down"
    assert instance(ec2, iid)["State"] == {"Code": 32, "Name": "shutting-down"}
    assert wait_until(lambda: instance(ec2, iid)["State"] == {"Code": 48, "Name": "terminated"}, 5)


def test_terminate_while_pending_reports_pending_as_previous(endpoint, ec2):
    ctl(endpoint, "POST", "/_kiln/delays", {"boot": 30})
    iid, _ = run_one(ec2)
    r = ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert r["PreviousState"]["Name"] == "pending"
    assert instance(ec2, iid)["State"]["Name"] == "terminated"  # terminate delay is 0


def test_image_delay_pending_then_available(endpoint, ec2):
    iid, _ = run_one(ec2)
    ctl(endpoint, "POST", "/_kiln/delays", {"image": 1.5})
    ami = ec2.create_image(InstanceId=iid, Name="delayed")["ImageId"]
    img = image(ec2, ami)
    assert img["State"] == "pending"
    snap = img["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["State"] == "pending"
    f = [{"Name": "state", "Values": ["pending"]}]
    assert [i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=f)["Images"]] == [ami]
    assert wait_until(lambda: image(ec2, ami)["State"] == "available", 5)
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["State"] == "completed"


def test_delays_via_control_api_roundtrip_and_validation(endpoint):
    s, d = ctl(endpoint, "POST", "/_kiln/delays", {"boot": 3, "stop": 2, "terminate": 1,
                                                   "image": 5, "copy": 5})
    assert s == 200 and d == {"boot": 3, "stop": 2, "terminate": 1, "image": 5, "copy": 5}
    assert ctl(endpoint, "GET", "/_kiln/delays")[1]["image"] == 5
    assert ctl(endpoint, "POST", "/_kiln/delays", {"reboot": 1})[0] == 400
    assert ctl(endpoint, "POST", "/_kiln/delays", {"boot": -1})[0] == 400
    assert ctl(endpoint, "DELETE", "/_kiln/delays")[1]["boot"] == 0


# ------------------------------------------------- b. ClientToken idempotency
def test_run_instances_client_token_idempotent(ec2, client):
    kw = dict(ClientToken="kiln-build-1", TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "b1"}]}])
    iid1, r1 = run_one(ec2, **kw)
    iid2, r2 = run_one(ec2, **kw)
    assert iid1 == iid2 and r1["ReservationId"] == r2["ReservationId"]
    assert r2["Instances"][0]["ClientToken"] == "kiln-build-1"
    all_ids = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert all_ids == [iid1]
    # another token: a new instance; same token, other params: mismatch
    iid3, _ = run_one(ec2, ClientToken="kiln-build-2")
    assert iid3 != iid1
    with pytest.raises(ClientError) as e:
        run_one(ec2, ClientToken="kiln-build-1", InstanceType="m5.large")
    assert err(e)[:2] == ("IdempotentParameterMismatch", 400)
    # tokens are per region
    iid4, _ = run_one(client("eu-west-1"), **kw)
    assert iid4 != iid1
    # still the same after termination
    ec2.terminate_instances(InstanceIds=[iid1])
    assert run_one(ec2, **kw)[0] == iid1


def test_client_token_concurrent_retries_make_one_instance(ec2):
    ids, errors = [], []

    def go():
        try:
            ids.append(run_one(ec2, ClientToken="race")[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(ids) == 8


def test_lost_reply_then_retry_with_same_token(endpoint, ec2):
    """when=after: the call takes effect but the client sees an error - the
    retry with the same ClientToken must return the same instance."""
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "RunInstances", "code": "InternalError",
                                            "when": "after"})
    with pytest.raises(ClientError) as e:
        run_one(ec2, ClientToken="lost")
    assert err(e)[:2] == ("InternalError", 500)
    [res] = ec2.describe_instances()["Reservations"]
    iid, _ = run_one(ec2, ClientToken="lost")
    assert iid == res["Instances"][0]["InstanceId"]


def test_copy_image_client_token_idempotent(client):
    us, eu = client("us-east-1"), client("eu-west-1")
    iid, _ = run_one(us)
    ami = us.create_image(InstanceId=iid, Name="tok-src")["ImageId"]
    a = eu.copy_image(SourceImageId=ami, SourceRegion="us-east-1", Name="tok-dst", ClientToken="c1")
    b = eu.copy_image(SourceImageId=ami, SourceRegion="us-east-1", Name="tok-dst", ClientToken="c1")
    assert a["ImageId"] == b["ImageId"]
    assert len(eu.describe_images(Owners=["self"])["Images"]) == 1


# ------------------------------------------------ c. duplicate AMI names
def test_duplicate_ami_name_rejected(ec2, client):
    iid, _ = run_one(ec2)
    ami = ec2.create_image(InstanceId=iid, Name="kiln-dup")["ImageId"]
    with pytest.raises(ClientError) as e:
        ec2.create_image(InstanceId=iid, Name="kiln-dup")
    code, status, msg = err(e)
    assert (code, status) == ("InvalidAMIName.Duplicate", 400)
    assert msg == f"AMI name kiln-dup is already in use by AMI {ami}"
    with pytest.raises(ClientError) as e:
        ec2.register_image(Name="kiln-dup", RootDeviceName="/dev/xvda")
    assert err(e)[0] == "InvalidAMIName.Duplicate"
    with pytest.raises(ClientError) as e:  # CopyImage within the region
        ec2.copy_image(SourceImageId=ami, SourceRegion="us-east-1", Name="kiln-dup")
    assert err(e)[0] == "InvalidAMIName.Duplicate"
    # the same name in another region is fine
    eu = client("eu-west-1")
    eu.copy_image(SourceImageId=ami, SourceRegion="us-east-1", Name="kiln-dup")
    # after DeregisterImage the name is free again
    ec2.deregister_image(ImageId=ami)
    assert ec2.create_image(InstanceId=iid, Name="kiln-dup")["ImageId"] != ami
    assert len(ec2.describe_images(Owners=["self"])["Images"]) == 1


# ------------------------------------------------------ d. fault injection
def test_throttle_next_two_calls_then_success(endpoint, ec2):
    iid, _ = run_one(ec2)
    s, f = ctl(endpoint, "POST", "/_kiln/faults", {"action": "CreateImage", "count": 2,
                                                   "code": "RequestLimitExceeded"})
    assert s == 200 and f["added"][0]["status"] == 503
    ec2.describe_instances()  # other actions unaffected
    for _ in range(2):
        with pytest.raises(ClientError) as e:
            ec2.create_image(InstanceId=iid, Name="throttled")
        code, status, msg = err(e)
        assert (code, status, msg) == ("RequestLimitExceeded", 503, "Request limit exceeded.")
        assert e.value.response["ResponseMetadata"]["RequestId"]
    ami = ec2.create_image(InstanceId=iid, Name="throttled")["ImageId"]
    assert [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]] == [ami]
    calls = ctl(endpoint, "GET", "/_kiln/calls")[1]["actions"]["CreateImage"]
    assert calls["total"] == 3 and calls["ok"] == 1 and calls["injected"] == 2
    assert calls["errors"] == {"RequestLimitExceeded": 2}
    assert ctl(endpoint, "GET", "/_kiln/faults")[1]["faults"] == []


def test_sdk_retries_through_throttling(endpoint, client):
    ec2 = client(retries=3)
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "DescribeImages", "count": 2,
                                            "code": "RequestLimitExceeded"})
    ec2.describe_images(Owners=["self"])
    c = ctl(endpoint, "GET", "/_kiln/calls")[1]["actions"]["DescribeImages"]
    assert (c["total"], c["ok"]) == (3, 1)


def test_fault_custom_status_message_region_skip(endpoint, client):
    us, eu = client("us-east-1"), client("eu-west-1")
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "DescribeVpcs", "code": "UnauthorizedOperation",
                                            "status": 403, "message": "nope <&>",
                                            "region": "eu-west-1", "skip": 1})
    us.describe_vpcs()
    eu.describe_vpcs()  # skipped once
    with pytest.raises(ClientError) as e:
        eu.describe_vpcs()
    assert err(e) == ("UnauthorizedOperation", 403, "nope <&>")
    eu.describe_vpcs()


def test_wildcard_latency_and_clear(endpoint, ec2):
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "*", "latency_ms": 300, "count": 2})
    t = time.time()
    ec2.describe_vpcs()
    ec2.describe_subnets()
    assert time.time() - t >= 0.6
    t = time.time()
    ec2.describe_vpcs()
    assert time.time() - t < 0.3
    # count <= 0: until cleared
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "*", "code": "Unavailable", "count": 0})
    for _ in range(3):
        with pytest.raises(ClientError):
            ec2.describe_vpcs()
    assert ctl(endpoint, "DELETE", "/_kiln/faults")[1] == {"cleared": 1}
    ec2.describe_vpcs()


def test_fault_probability_is_replayable_by_seed(endpoint, client):
    ec2 = client(retries=1)

    def run(seed):
        ctl(endpoint, "DELETE", "/_kiln/faults")
        ctl(endpoint, "POST", "/_kiln/faults", {"action": "DescribeVpcs", "code": "InvalidVpcID.Malformed",
                                                "count": 0, "probability": 0.5, "seed": seed})
        hits = []
        for _ in range(40):
            try:
                ec2.describe_vpcs()
                hits.append(0)
            except ClientError:
                hits.append(1)
        return hits

    a, b, c = run(11), run(11), run(12)
    assert a == b, "the same seed gives the same hits"
    assert a != c
    assert 5 < sum(a) < 35
    assert ctl(endpoint, "GET", "/_kiln/faults")[1]["faults"][0]["probability"] == 0.5
    assert ctl(endpoint, "POST", "/_kiln/faults", {"action": "X", "code": "Y", "probability": 0})[0] == 400
    ctl(endpoint, "DELETE", "/_kiln/faults")


def test_fault_validation(endpoint):
    assert ctl(endpoint, "POST", "/_kiln/faults", {"action": "X"})[0] == 400
    assert ctl(endpoint, "POST", "/_kiln/faults", {"code": "X"})[0] == 400
    assert ctl(endpoint, "POST", "/_kiln/faults", {"action": "X", "code": "Y", "bogus": 1})[0] == 400


# --------------------------------------------------------- e. call counts
def test_call_accounting(endpoint, ec2):
    ec2.describe_vpcs()
    ec2.describe_vpcs()
    with pytest.raises(ClientError):
        ec2.describe_images(ImageIds=["ami-00000000"])
    s, c = ctl(endpoint, "GET", "/_kiln/calls?log=1")
    assert s == 200 and c["total"] == 3
    assert c["actions"]["DescribeVpcs"] == {"total": 2, "ok": 2, "errors": {}, "injected": 0,
                                            "regions": {"us-east-1": 2}}
    assert c["actions"]["DescribeImages"]["errors"] == {"InvalidAMIID.NotFound": 1}
    assert [e["action"] for e in c["log"]] == ["DescribeVpcs", "DescribeVpcs", "DescribeImages"]
    assert c["log"][2]["status"] == 400
    # GET ?reset=1 returns then clears; DELETE clears
    assert ctl(endpoint, "GET", "/_kiln/calls?reset=1")[1]["total"] == 3
    assert ctl(endpoint, "GET", "/_kiln/calls")[1]["total"] == 0
    ec2.describe_vpcs()
    assert ctl(endpoint, "DELETE", "/_kiln/calls")[0] == 200
    assert ctl(endpoint, "GET", "/_kiln/calls")[1] == {"total": 0, "actions": {}}


# ------------------------------------------------------ f. image loading
CANONICAL = "099720109477"


def load(endpoint, images, region=None):
    path = "/_kiln/images" + (f"?region={region}" if region else "")
    s, body = ctl(endpoint, "POST", path, images)
    assert s == 200, body
    return {i["name"]: i["image_id"] for i in body["images"]}


def test_load_images_filters_and_most_recent(endpoint, ec2):
    ids = load(endpoint, [
        {"name": "ubuntu-22.04-amd64-20240101", "creation_date": "2024-01-01T00:00:00.000Z",
         "owner": CANONICAL, "architecture": "x86_64", "tags": {"os": "ubuntu", "rel": "old"}},
        {"name": "ubuntu-22.04-amd64-20240601", "creation_date": "2024-06-01T00:00:00.000Z",
         "owner": CANONICAL, "architecture": "x86_64", "tags": {"os": "ubuntu", "rel": "new"}},
        {"name": "ubuntu-22.04-arm64-20240901", "creation_date": "2024-09-01T00:00:00.000Z",
         "owner": CANONICAL, "architecture": "arm64", "tags": {"os": "ubuntu"}},
        {"name": "debian-12-amd64-20241001", "creation_date": "2024-10-01T00:00:00.000Z",
         "owner": "136693071363", "architecture": "x86_64", "tags": {"os": "debian"}},
        {"name": "my-own-base", "creation_date": "2023-01-01T00:00:00.000Z"},
    ])
    assert all(v.startswith("ami-") for v in ids.values())

    def names(**kw):
        return sorted(i["Name"] for i in ec2.describe_images(**kw)["Images"])

    f = [{"Name": "name", "Values": ["ubuntu-22.04-*"]},
         {"Name": "architecture", "Values": ["x86_64"]},
         {"Name": "state", "Values": ["available"]}]
    imgs = ec2.describe_images(Owners=[CANONICAL], Filters=f)["Images"]
    assert sorted(i["Name"] for i in imgs) == ["ubuntu-22.04-amd64-20240101",
                                               "ubuntu-22.04-amd64-20240601"]
    newest = max(imgs, key=lambda i: i["CreationDate"])  # what most_recent does client-side
    assert newest["ImageId"] == ids["ubuntu-22.04-amd64-20240601"]
    assert newest["CreationDate"] == "2024-06-01T00:00:00.000Z"
    assert newest["OwnerId"] == CANONICAL and newest["State"] == "available"
    assert newest["RootDeviceType"] == "ebs" and newest["VirtualizationType"] == "hvm"

    assert names(Filters=[{"Name": "tag:os", "Values": ["debian"]}]) == ["debian-12-amd64-20241001"]
    assert names(Filters=[{"Name": "tag:rel", "Values": ["new"]}]) == ["ubuntu-22.04-amd64-20240601"]
    assert names(Filters=[{"Name": "tag-key", "Values": ["rel"]}]) == [
        "ubuntu-22.04-amd64-20240101", "ubuntu-22.04-amd64-20240601"]
    assert names(Filters=[{"Name": "owner-id", "Values": ["136693071363"]}]) == [
        "debian-12-amd64-20241001"]
    assert names(Owners=["self"]) == ["my-own-base"]  # default owner: the account
    assert len(names(Owners=[CANONICAL, "136693071363"])) == 4
    assert names(Filters=[{"Name": "image-id", "Values": [ids["my-own-base"]]}]) == ["my-own-base"]
    assert names(Owners=[CANONICAL], Filters=[{"Name": "name", "Values": ["nomatch-*"]}]) == []

    # a loaded image can be launched, and its id resolves directly
    iid, _ = run_one(ec2, ImageId=ids["ubuntu-22.04-arm64-20240901"])
    assert instance(ec2, iid)["Architecture"] == "arm64"
    assert image(ec2, ids["debian-12-amd64-20241001"])["Name"] == "debian-12-amd64-20241001"
    # same name + owner again: conflict
    s, _ = ctl(endpoint, "POST", "/_kiln/images", [{"name": "my-own-base"}])
    assert s == 409


def test_load_images_other_region_and_explicit_id(endpoint, client):
    ids = load(endpoint, {"region": "eu-west-1", "images": [
        {"name": "eu-base", "image_id": "ami-0123456789abcdef0", "owner": CANONICAL}]})
    assert ids == {"eu-base": "ami-0123456789abcdef0"}
    eu = client("eu-west-1")
    assert image(eu, "ami-0123456789abcdef0")["Name"] == "eu-base"
    assert client("us-east-1").describe_images(Owners=[CANONICAL])["Images"] == []
    load(endpoint, [{"name": "eu2"}], region="eu-west-1")
    assert [i["Name"] for i in eu.describe_images(Owners=["self"])["Images"]] == ["eu2"]


def test_image_state_control(endpoint, ec2):
    ids = load(endpoint, [{"name": "to-fail"}])
    s, _ = ctl(endpoint, "POST", "/_kiln/image-state",
               {"image_id": ids["to-fail"], "state": "failed", "reason": "boom"})
    assert s == 200
    img = image(ec2, ids["to-fail"])
    assert img["State"] == "failed" and img["StateReason"]["Message"] == "boom"


def test_instance_state_control(endpoint, ec2):
    iid, _ = run_one(ec2)
    s, _ = ctl(endpoint, "POST", "/_kiln/instance-state",
               {"instance_id": iid, "state": "terminated", "reason": "Server.SpotInstanceTermination"})
    assert s == 200
    i = instance(ec2, iid)
    assert i["State"]["Name"] == "terminated"
    assert i["StateReason"]["Message"] == "Server.SpotInstanceTermination"


# ---------------------------------------------- g. cross-region CopyImage
def test_cross_region_copy_image(endpoint, client):
    us, eu = client("us-east-1"), client("eu-west-1")
    iid, _ = run_one(us)
    src = us.create_image(InstanceId=iid, Name="kiln-src",
                          TagSpecifications=[{"ResourceType": "image",
                                              "Tags": [{"Key": "k", "Value": "v"}]}])["ImageId"]
    ctl(endpoint, "POST", "/_kiln/delays", {"copy": 1})
    kms = f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    dst = eu.copy_image(SourceImageId=src, SourceRegion="us-east-1", Name="kiln-src",
                        Description="copied", Encrypted=True, KmsKeyId=kms,
                        TagSpecifications=[
                            {"ResourceType": "image", "Tags": [{"Key": "built-by", "Value": "kiln"}]},
                            {"ResourceType": "snapshot", "Tags": [{"Key": "s", "Value": "1"}]}],
                        )["ImageId"]
    assert dst != src
    img = image(eu, dst)
    assert img["State"] == "pending" and img["Name"] == "kiln-src"
    assert img["Description"] == "copied" and img["OwnerId"] == ACCOUNT
    assert {t["Key"]: t["Value"] for t in img["Tags"]} == {"built-by": "kiln"}  # not copied
    ebs = img["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["KmsKeyId"] == kms
    snap = eu.describe_snapshots(SnapshotIds=[ebs["SnapshotId"]])["Snapshots"][0]
    assert snap["Encrypted"] is True and snap["KmsKeyId"] == kms
    assert snap["Tags"] == [{"Key": "s", "Value": "1"}]
    assert wait_until(lambda: image(eu, dst)["State"] == "available", 5)
    # in the destination region only
    with pytest.raises(ClientError) as e:
        us.describe_images(ImageIds=[dst])
    assert err(e)[0] == "InvalidAMIID.NotFound"
    assert [i["ImageId"] for i in eu.describe_images(Owners=["self"])["Images"]] == [dst]
    # CopyImageTags copies user tags
    dst2 = eu.copy_image(SourceImageId=src, SourceRegion="us-east-1", Name="kiln-src-2",
                         CopyImageTags=True)["ImageId"]
    assert image(eu, dst2)["Tags"] == [{"Key": "k", "Value": "v"}]
    # errors
    with pytest.raises(ClientError) as e:
        eu.copy_image(SourceImageId="ami-00000000000000000", SourceRegion="us-east-1", Name="xyz")
    assert err(e)[0] == "InvalidAMIID.NotFound"
    with pytest.raises(ClientError) as e:
        eu.copy_image(SourceImageId=src, SourceRegion="xx-nowhere-1", Name="xyz")
    assert err(e)[0] == "InvalidParameterValue"


# ------------------------------------------- security groups, key pairs, ...
def test_delete_security_group_dependency_violation(endpoint, ec2):
    sg = ec2.create_security_group(GroupName="kiln-build-sg", Description="kiln")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    iid, _ = run_one(ec2, SecurityGroupIds=[sg])
    assert [g["GroupId"] for g in instance(ec2, iid)["SecurityGroups"]] == [sg]
    with pytest.raises(ClientError) as e:
        ec2.delete_security_group(GroupId=sg)
    assert err(e) == ("DependencyViolation", 400, f"resource {sg} has a dependent object")
    ctl(endpoint, "POST", "/_kiln/delays", {"terminate": 1})
    ec2.terminate_instances(InstanceIds=[iid])
    with pytest.raises(ClientError) as e:  # still shutting-down
        ec2.delete_security_group(GroupId=sg)
    assert err(e)[0] == "DependencyViolation"
    assert wait_until(lambda: instance(ec2, iid)["State"]["Name"] == "terminated", 5)
    ec2.delete_security_group(GroupId=sg)
    with pytest.raises(ClientError) as e:
        ec2.delete_security_group(GroupId=sg)
    assert err(e)[0] == "InvalidGroup.NotFound"


def test_security_group_by_name_in_use(ec2):
    ec2.create_security_group(GroupName="byname", Description="d")
    iid, _ = run_one(ec2, SecurityGroups=["byname"])
    with pytest.raises(ClientError) as e:
        ec2.delete_security_group(GroupName="byname")
    assert err(e)[0] == "DependencyViolation"
    ec2.terminate_instances(InstanceIds=[iid])
    ec2.delete_security_group(GroupName="byname")


def test_key_pairs(ec2):
    kp = ec2.create_key_pair(KeyName="kiln-k1", TagSpecifications=[
        {"ResourceType": "key-pair", "Tags": [{"Key": "kiln", "Value": "1"}]}])
    assert kp["KeyMaterial"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert kp["KeyPairId"].startswith("key-") and len(kp["KeyFingerprint"].split(":")) == 20
    assert kp["Tags"] == [{"Key": "kiln", "Value": "1"}]
    ed = ec2.create_key_pair(KeyName="kiln-k2", KeyType="ed25519")
    assert ed["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    [d] = ec2.describe_key_pairs(KeyNames=["kiln-k1"])["KeyPairs"]
    assert d["Tags"] == [{"Key": "kiln", "Value": "1"}] and "KeyMaterial" not in d
    assert [k["KeyName"] for k in ec2.describe_key_pairs(
        Filters=[{"Name": "tag:kiln", "Values": ["1"]}])["KeyPairs"]] == ["kiln-k1"]
    with pytest.raises(ClientError) as e:
        ec2.create_key_pair(KeyName="kiln-k1")
    assert err(e)[0] == "InvalidKeyPair.Duplicate"
    ec2.delete_key_pair(KeyName="kiln-k1")
    ec2.delete_key_pair(KeyName="kiln-k1")  # idempotent, like AWS
    with pytest.raises(ClientError) as e:
        ec2.describe_key_pairs(KeyNames=["kiln-k1"])
    assert err(e)[0] == "InvalidKeyPair.NotFound"
    # By ID: only that key pair, whatever else has a name.
    assert ec2.delete_key_pair(KeyPairId=ed["KeyPairId"])["KeyPairId"] == ed["KeyPairId"]
    with pytest.raises(ClientError) as e:
        ec2.describe_key_pairs(KeyNames=["kiln-k2"])
    assert err(e)[0] == "InvalidKeyPair.NotFound"
    ec2.delete_key_pair(KeyPairId=ed["KeyPairId"])  # gone already: done


def test_import_key_pair(ec2):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b" kiln@test"
    kp = ec2.import_key_pair(KeyName="kiln-imported", PublicKeyMaterial=pub, TagSpecifications=[
        {"ResourceType": "key-pair", "Tags": [{"Key": "kiln", "Value": "1"}]}])
    assert kp["KeyPairId"].startswith("key-") and kp["Tags"] == [{"Key": "kiln", "Value": "1"}]
    assert len(kp["KeyFingerprint"].split(":")) == 32  # colon-hex SHA-256 (AWS: base64)
    [d] = ec2.describe_key_pairs(KeyNames=["kiln-imported"])["KeyPairs"]
    assert d["KeyType"] == "ed25519" and d["KeyFingerprint"] == kp["KeyFingerprint"]
    with pytest.raises(ClientError) as e:
        ec2.import_key_pair(KeyName="kiln-imported", PublicKeyMaterial=pub)
    assert err(e)[0] == "InvalidKeyPair.Duplicate"
    with pytest.raises(ClientError) as e:
        ec2.import_key_pair(KeyName="bad", PublicKeyMaterial=b"garbage")
    assert err(e)[0] == "InvalidKeyPair.Format"
    iid, _ = run_one(ec2, KeyName="kiln-imported")
    assert instance(ec2, iid)["KeyName"] == "kiln-imported"


def test_unknown_region_unimplemented_action_and_request_ids(endpoint, client):
    with pytest.raises(ClientError) as e:
        client("xx-nowhere-1").describe_instances()
    assert err(e)[:2] == ("AuthFailure", 401)
    ec2 = client()
    with pytest.raises(ClientError) as e:  # not retryable: the SDK fails fast
        ec2.describe_fast_launch_images()
    assert err(e)[:2] == ("InvalidAction", 400)
    a = ec2.describe_vpcs()["ResponseMetadata"]["RequestId"]
    b = ec2.describe_vpcs()["ResponseMetadata"]["RequestId"]
    assert a != b and a != "request-id"


def test_run_instances_tag_specifications_and_create_tags(ec2):
    sg_default = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]
    iid, r = run_one(ec2, KeyName="kiln-k", TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "kiln-build"}]},
        {"ResourceType": "volume", "Tags": [{"Key": "vol", "Value": "yes"}]}])
    i = instance(ec2, iid)
    assert i["KeyName"] == "kiln-k" and i["InstanceType"] == "t3.micro"
    assert i["Tags"] == [{"Key": "Name", "Value": "kiln-build"}]
    assert i["SubnetId"].startswith("subnet-") and i["VpcId"] == sg_default["VpcId"]
    vols = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [iid]}])
    assert [v["Tags"] for v in vols["Volumes"]] == [[{"Key": "vol", "Value": "yes"}]]
    ec2.create_tags(Resources=[iid], Tags=[{"Key": "extra", "Value": "1"}])
    assert {t["Key"] for t in instance(ec2, iid)["Tags"]} == {"Name", "extra"}
    f = [{"Name": "tag:Name", "Values": ["kiln-build"]}]
    assert len(ec2.describe_instances(Filters=f)["Reservations"]) == 1


def test_create_image_snapshot_tags_and_snapshot_lifecycle(ec2):
    iid, _ = run_one(ec2)
    ami = ec2.create_image(InstanceId=iid, Name="kiln-snaptags", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": "i", "Value": "1"}]},
        {"ResourceType": "snapshot", "Tags": [{"Key": "s", "Value": "1"}]}])["ImageId"]
    img = image(ec2, ami)
    assert img["Tags"] == [{"Key": "i", "Value": "1"}]
    snap = img["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    mine = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert [s["SnapshotId"] for s in mine] == [snap] and mine[0]["Tags"] == [{"Key": "s", "Value": "1"}]
    assert ec2.describe_snapshots(OwnerIds=["999999999999"])["Snapshots"] == []
    ec2.create_tags(Resources=[snap], Tags=[{"Key": "later", "Value": "x"}])
    with pytest.raises(ClientError) as e:
        ec2.delete_snapshot(SnapshotId=snap)
    assert err(e)[0] == "InvalidSnapshot.InUse"
    ec2.deregister_image(ImageId=ami)
    ec2.delete_snapshot(SnapshotId=snap)
    with pytest.raises(ClientError) as e:
        ec2.describe_snapshots(SnapshotIds=[snap])
    assert err(e)[0] == "InvalidSnapshot.NotFound"
    assert ec2.describe_images(ImageIds=[ami])["Images"] == []  # deregistered: empty, no error


def test_reset_clears_everything(endpoint, ec2):
    run_one(ec2)
    load(endpoint, [{"name": "gone"}])
    ctl(endpoint, "POST", "/_kiln/faults", {"action": "*", "latency_ms": 1, "count": 0})
    ctl(endpoint, "POST", "/_kiln/reset")
    assert ec2.describe_instances()["Reservations"] == []
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    assert ctl(endpoint, "GET", "/_kiln/faults")[1]["faults"] == []
