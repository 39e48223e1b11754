"""The embedded AWS endpoint: moto's server on 127.0.0.1, spoken to over real HTTP with real boto3.

It is fedimg's default target, so that a demo or a test never touches an AWS account by accident.

moto keeps little of some APIs. Where that would make fedimg's behaviour untestable, this module
makes the emulator more faithful to AWS (never the other way round: fedimg is not weakened to fit
moto). Each fidelity fix says which AWS behaviour it restores:

- EBS ``StartSnapshot`` honours ``ClientToken`` (a retried start returns the same snapshot), reports
  AWS's 512 KiB ``BlockSize``, keeps ``Encrypted``, and creates no volume (moto made one as a side
  effect, which would look like a leaked volume). The EC2 snapshot stays ``pending`` until
  ``CompleteSnapshot``.
- EBS ``ListSnapshotBlocks`` returns blocks in index order and pages with ``MaxResults`` /
  ``NextToken`` / ``StartingBlockIndex`` like AWS.
- EC2 ``RegisterImage`` keeps what AWS keeps (moto kept only the name): block device mappings
  (pointing at the given snapshot, not a made-up one), architecture, virtualization, kernel, root
  device, boot mode, ENA/SR-IOV/TPM/IMDS attributes, image location and tags; and, like AWS, it
  refuses a name already in use (``InvalidAMIName.Duplicate``) and an unknown snapshot.
- EC2 ``RunInstances`` and ``CreateVolume`` honour ``ClientToken`` (a retried call returns the
  instance or volume the first one made, instead of making another that nobody tracks).
- EC2 ``DeleteKeyPair`` honours ``KeyPairId`` (moto only looked at ``KeyName`` and silently kept
  the key pair).

A few more patches only make moto's server cheaper per request (see :func:`_speed_up_dispatch`):
the benchmark runs fedimg, xz and this endpoint on the same cores, so the endpoint's CPU is
fedimg's wall time. They change no answer.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: The account id moto answers with; the embedded target's credentials are fixed and fake.
EMBEDDED_ACCOUNT_ID = "123456789012"
EMBEDDED_ACCESS_KEY = "fedimg-embedded"
EMBEDDED_SECRET_KEY = "fedimg-embedded"
EBS_BLOCK_SIZE = 512 * 1024

#: Host names whose moto backend the dispatcher remembers (a handful are ever used: service × region).
_MAX_KNOWN_HOSTS = 4096
#: Request bodies up to this size are read in one call before moto sees them (EBS blocks: 512 KiB).
_MAX_BUFFERED_BODY = 16 * 1024 * 1024

_patch_lock = threading.Lock()
_patched = False


@dataclass(frozen=True)
class EmbeddedEndpoint:
    """Where a running embedded endpoint listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The endpoint URL to give boto3."""
        return f"http://{self.host}:{self.port}"


class EmbeddedAWS:
    """moto's threaded server in this process; a context manager.

    ``start`` binds 127.0.0.1 at ``port`` (0: a free port). The emulator's state is per process, so
    two instances in one process share it; :meth:`reset` clears it.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._server: Any = None
        self._endpoint: EmbeddedEndpoint | None = None

    @property
    def endpoint(self) -> EmbeddedEndpoint:
        """The running endpoint; raises RuntimeError before :meth:`start`."""
        if self._endpoint is None:
            raise RuntimeError("the embedded AWS endpoint is not started")
        return self._endpoint

    def start(self) -> EmbeddedEndpoint:
        """Start the server (idempotent) and return where it listens."""
        if self._endpoint is not None:
            return self._endpoint
        # moto would otherwise preload ~1300 public AMIs per region: slow to start, and noise in
        # every listing. Set before moto's EC2 backend is first used.
        os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        apply_fidelity_fixes()
        # Werkzeug logs every request at INFO; fedimg's own log says what matters.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        from moto.server import ThreadedMotoServer

        # Not HTTP/1.1 keep-alive: it saved under a CPU-second in the 2 GiB benchmark, and with
        # it the QEMU runner's guests refused SSH channels (not understood; left off).

        self._server = ThreadedMotoServer(ip_address=self._host, port=self._port, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint = EmbeddedEndpoint(host=host, port=int(port))
        log.debug("embedded AWS endpoint listening on %s", self._endpoint.url)
        return self._endpoint

    def stop(self) -> None:
        """Stop the server if it runs."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._endpoint = None

    def reset(self) -> None:
        """Forget every resource the emulator holds (moto's reset API, over HTTP)."""
        request = urllib.request.Request(f"{self.endpoint.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> EmbeddedAWS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def apply_fidelity_fixes() -> None:
    """Make moto's EBS direct APIs behave as AWS's do (see the module docstring). Idempotent."""
    global _patched  # noqa: PLW0603 - a process-wide, once-only patch
    with _patch_lock:
        if _patched:
            return
        from moto.core.responses import ActionResult
        from moto.ebs.responses import EBSResponse

        def start_snapshot(self: Any) -> Any:
            backend = self.ebs_backend
            tokens: dict[str, str] = backend.__dict__.setdefault("_fedimg_client_tokens", {})
            token = self._get_param("ClientToken")
            snapshot = backend.snapshots.get(tokens.get(token, "")) if token else None
            if snapshot is None:
                snapshot = backend.start_snapshot(
                    volume_size=self._get_param("VolumeSize"),
                    tags=self._get_param("Tags"),
                    description=self._get_param("Description"),
                )
                snapshot.block_size = EBS_BLOCK_SIZE
                ec2_snapshot = backend.ec2_backend.snapshots[snapshot.snapshot_id]
                ec2_snapshot.status = "pending"
                ec2_snapshot.encrypted = bool(self._get_param("Encrypted"))
                # AWS's StartSnapshot makes no volume; moto's helper volume would look leaked.
                backend.ec2_backend.volumes.pop(ec2_snapshot.volume.id, None)
                if token:
                    tokens[token] = snapshot.snapshot_id
            return ActionResult(
                {
                    "SnapshotId": snapshot.snapshot_id,
                    "OwnerId": snapshot.account_id,
                    "Status": snapshot.status,
                    "StartTime": snapshot.start_time,
                    "VolumeSize": snapshot.volume_size,
                    "BlockSize": snapshot.block_size,
                    "Tags": snapshot.tags,
                    "Description": snapshot.description,
                }
            )

        def complete_snapshot(self: Any) -> Any:
            snapshot_id = self._get_param("SnapshotId")
            status = self.ebs_backend.complete_snapshot(snapshot_id=snapshot_id)
            ec2_snapshot = self.ebs_backend.ec2_backend.snapshots.get(snapshot_id)
            if ec2_snapshot is not None:
                ec2_snapshot.status = "completed"
            return ActionResult({"Status": status})

        def list_snapshot_blocks(self: Any) -> Any:
            snapshot = self.ebs_backend.list_snapshot_blocks(
                snapshot_id=self._get_param("SnapshotId")
            )
            start = int(self._get_param("NextToken") or self._get_param("StartingBlockIndex") or 0)
            limit = int(self._get_param("MaxResults") or 10000)
            indexes = sorted(i for i in snapshot.blocks if i >= start)
            page, rest = indexes[:limit], indexes[limit:]
            result: dict[str, Any] = {
                "Blocks": [
                    {"BlockIndex": i, "BlockToken": snapshot.blocks[i].block_token} for i in page
                ],
                "VolumeSize": snapshot.volume_size,
                "BlockSize": snapshot.block_size,
            }
            if rest:
                result["NextToken"] = str(rest[0])
            return ActionResult(result)

        _speed_up_dispatch()
        _speed_up_ebs_actions()
        _fix_register_image()
        _add_image_block_public_access()
        _fix_client_tokens()
        _fix_delete_key_pair()
        setattr(EBSResponse, "start_snapshot", start_snapshot)  # noqa: B010
        setattr(EBSResponse, "complete_snapshot", complete_snapshot)  # noqa: B010
        setattr(EBSResponse, "list_snapshot_blocks", list_snapshot_blocks)  # noqa: B010
        _patched = True


def serve_forever(*, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Run the embedded endpoint in the foreground until interrupted (``fedimg embedded serve``)."""
    aws = EmbeddedAWS(host=host, port=port)
    endpoint = aws.start()
    print(f"embedded AWS endpoint: {endpoint.url}", flush=True)
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        aws.stop()


def _speed_up_dispatch() -> None:
    """Cut the endpoint's per-request CPU where moto's server spends it needlessly (speed only:
    every request is routed, parsed and answered as before).

    Measured on PutSnapshotBlock (512 KiB, 8 concurrent clients), the endpoint's CPU per request
    went from about 3.9 ms to 2.2 ms with these and :func:`_speed_up_ebs_actions`:

    - moto's dispatcher finds the backend for a Host by listing its own package directory (one
      ``isdir`` per service, ~250) and trying every service's URL regex, per request and under
      one lock (~0.4 ms). The answer depends on the host name only (the directory and the
      patterns do not change while the server runs), so it is kept per host.
    - werkzeug reads a body through a Python loop of 64 KiB reads, then copies it (~0.35 ms
      for 512 KiB); the body is read here in one buffered call instead, as moto itself does
      for form bodies, and handed on as a stream that ends where the body does.
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    original: Any = DomainDispatcherApplication.get_backend_for_host
    known: dict[str | None, Any] = {}

    def get_backend_for_host(self: Any, host: str | None) -> Any:
        # Callers hold the dispatcher's lock; a dict lookup and insert need no more.
        try:
            return known[host]
        except KeyError:
            backend = original(self, host)
            if len(known) < _MAX_KNOWN_HOSTS:  # hosts come from requests: keep the table bounded
                known[host] = backend
            return backend

    original_call: Any = DomainDispatcherApplication.__call__

    def call(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        # Only a body with a Content-Length that is not already framed by the server (chunked
        # bodies are); moto reads every body whole anyway, so buffering it costs no memory.
        length = environ.get("CONTENT_LENGTH") or ""
        size = int(length) if length.isdigit() else 0
        if 0 < size <= _MAX_BUFFERED_BODY and not environ.get("wsgi.input_terminated"):
            try:
                body = environ["wsgi.input"].read(size)
            except (OSError, ValueError):
                body = b""  # a short body reads as a client disconnect, as before
            environ["wsgi.input"] = io.BytesIO(body)
            # The stream now ends where the body does, so werkzeug may read it as it is (one
            # read, no copy) instead of through its length-limiting wrapper.
            environ["wsgi.input_terminated"] = True
        return original_call(self, environ, start_response)

    setattr(DomainDispatcherApplication, "get_backend_for_host", get_backend_for_host)  # noqa: B010
    setattr(DomainDispatcherApplication, "__call__", call)  # noqa: B010


def _speed_up_ebs_actions() -> None:
    """Work out an EBS request's operation once, and a response class's handlers once.

    moto routes a REST request (method and path against every operation's URI template) each
    time it needs the operation's name: four times per PutSnapshotBlock. The name cannot change
    within a request (a response object serves one request), so it is kept after the first.
    moto also lists a response class's methods (``inspect.getmembers``) on every request; they
    are fixed once the fidelity fixes are in (applied before the server starts), so the list
    is kept per class.
    """
    from moto.core import responses
    from moto.core.utils import method_names_from_class as list_methods
    from moto.ebs.responses import EBSResponse

    route: Any = responses.BaseResponse._get_action
    methods: dict[type, frozenset[str]] = {}

    def get_action(self: Any) -> Any:
        action = self.__dict__.get("_fedimg_action")
        if action is None:
            action = route(self)
            if action:
                self.__dict__["_fedimg_action"] = action
        return action

    def method_names_from_class(clazz: Any) -> frozenset[str]:
        names = methods.get(clazz)
        if names is None:
            names = methods[clazz] = frozenset(list_methods(clazz))
        return names

    setattr(EBSResponse, "_get_action", get_action)  # noqa: B010
    setattr(responses, "method_names_from_class", method_names_from_class)  # noqa: B010


def _fix_register_image() -> None:
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.amis import Ami
    from moto.ec2.responses.amis import AmisResponse

    original_mappings: Any = Ami.block_device_mappings

    def block_device_mappings(self: Any) -> Any:
        kept = self.__dict__.get("_fedimg_mappings")
        return kept if kept is not None else original_mappings.fget(self)

    def register_image(self: Any) -> Any:
        self.error_on_dryrun()
        backend = self.ec2_backend
        name = self._get_param("Name")
        for existing in backend.amis.values():
            if existing.name == name and existing.owner_id == backend.account_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by AMI {existing.id}",
                )
        mappings = self._get_param("BlockDeviceMappings", []) or []
        root_snapshot = None
        for mapping in mappings:
            snapshot_id = (mapping.get("Ebs") or {}).get("SnapshotId")
            if snapshot_id:
                if snapshot_id not in backend.snapshots:
                    raise EC2ClientError(
                        "InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist."
                    )
                root_snapshot = root_snapshot or backend.snapshots[snapshot_id]
        image = backend.register_image(name, self._get_param("Description", ""))
        # moto invents a snapshot for every AMI; AWS uses the one in the mappings.
        backend.snapshots.pop(image.ebs_snapshot.id, None)
        if root_snapshot is not None:
            image.ebs_snapshot = root_snapshot
        image.architecture = self._get_param("Architecture") or "i386"
        image.virtualization_type = self._get_param("VirtualizationType") or "paravirtual"
        image.kernel_id = self._get_param("KernelId")
        image.root_device_name = self._get_param("RootDeviceName") or image.root_device_name
        image.root_device_type = "ebs" if root_snapshot is not None else "instance-store"
        image.boot_mode = self._get_param("BootMode")
        image.image_location = self._get_param("ImageLocation")
        image.ena_support = bool(self._get_param("EnaSupport"))
        image.sriov_net_support = self._get_param("SriovNetSupport")
        image.tpm_support = self._get_param("TpmSupport")
        image.imds_support = self._get_param("ImdsSupport")
        image.__dict__["_fedimg_mappings"] = [
            {
                "DeviceName": m.get("DeviceName"),
                **({"Ebs": dict(m["Ebs"])} if m.get("Ebs") else {}),
                **({"VirtualName": m["VirtualName"]} if m.get("VirtualName") else {}),
            }
            for m in mappings
        ]
        for spec in self._get_param("TagSpecifications", []) or []:
            if spec.get("ResourceType") == "image":
                tags = {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
                backend.create_tags([image.id], tags)
        return ActionResult({"ImageId": image.id})

    setattr(Ami, "block_device_mappings", property(block_device_mappings))  # noqa: B010
    setattr(AmisResponse, "register_image", register_image)  # noqa: B010


def _fix_client_tokens() -> None:
    from moto.core.responses import ActionResult
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore
    from moto.ec2.responses.instances import InstanceResponse

    original_run: Any = InstanceResponse.run_instances
    original_create: Any = ElasticBlockStore.create_volume

    def tokens(backend: Any, kind: str) -> dict[str, Any]:
        table: dict[str, Any] = backend.__dict__.setdefault(f"_fedimg_{kind}_tokens", {})
        return table

    def run_instances(self: Any) -> Any:
        token = self._get_param("ClientToken")
        table = tokens(self.ec2_backend, "instance")
        if token and token in table:
            return ActionResult(table[token])
        result = original_run(self)
        if token:
            # ActionResult keeps the reservation it renders; a retry renders the same one.
            table[token] = _action_value(result)
        return result

    def create_volume(self: Any) -> Any:
        token = self._get_param("ClientToken")
        table = tokens(self.ec2_backend, "volume")
        volume_id = table.get(token) if token else None
        if volume_id is not None and volume_id in self.ec2_backend.volumes:
            return ActionResult(self.ec2_backend.volumes[volume_id])
        result = original_create(self)
        if token:
            table[token] = _action_value(result).id
        return result

    setattr(InstanceResponse, "run_instances", run_instances)  # noqa: B010
    setattr(ElasticBlockStore, "create_volume", create_volume)  # noqa: B010


def _action_value(result: Any) -> Any:
    """The object an ActionResult renders (moto keeps it as ``result``)."""
    return getattr(result, "result", result)


def _fix_delete_key_pair() -> None:
    from moto.core.responses import ActionResult
    from moto.ec2.responses.key_pairs import KeyPairs

    def delete_key_pair(self: Any) -> Any:
        self.error_on_dryrun()
        backend = self.ec2_backend
        name = self._get_param("KeyName")
        pair_id = self._get_param("KeyPairId")
        if not name and pair_id:
            name = next((k for k, v in backend.key_pairs.items() if v.id == pair_id), None)
        pair = backend.delete_key_pair(name) if name else None
        return ActionResult({"Return": True, "KeyPairId": pair.id if pair else None})

    setattr(KeyPairs, "delete_key_pair", delete_key_pair)  # noqa: B010


def _add_image_block_public_access() -> None:
    from moto.core.responses import ActionResult
    from moto.ec2.responses import EC2Response

    def state(self: Any) -> dict[str, str]:
        store: dict[str, str] = self.ec2_backend.__dict__.setdefault(
            "_fedimg_block_public_access", {"state": "unblocked"}
        )
        return store

    def get(self: Any) -> Any:
        return ActionResult({"ImageBlockPublicAccessState": state(self)["state"]})

    def enable(self: Any) -> Any:
        state(self)["state"] = self._get_param("ImageBlockPublicAccessState") or "block-new-sharing"
        return ActionResult({"ImageBlockPublicAccessState": state(self)["state"]})

    def disable(self: Any) -> Any:
        state(self)["state"] = "unblocked"
        return ActionResult({"ImageBlockPublicAccessState": "unblocked"})

    setattr(EC2Response, "get_image_block_public_access_state", get)  # noqa: B010
    setattr(EC2Response, "enable_image_block_public_access", enable)  # noqa: B010
    setattr(EC2Response, "disable_image_block_public_access", disable)  # noqa: B010
