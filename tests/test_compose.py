"""Compose metadata: found under a compose location, read with productmd, images selected by config."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedimg.compose import (
    ComposeError,
    ComposeImage,
    find_metadata,
    load_compose,
    release_from_compose_id,
)
from fedimg.config import ComposeSettings
from tests.amqp_support import ComposeTree, TreeImage, build_compose_tree, serve_directory

COMPOSE_ID = "Fedora-41-20250101.0"
EC2_X86 = "Cloud/x86_64/images/Fedora-Cloud-Base-AmazonEC2.x86_64-41-20250101.0.raw.xz"
EC2_ARM = "Cloud/aarch64/images/Fedora-Cloud-Base-AmazonEC2.aarch64-41-20250101.0.raw.xz"
ENTRIES = [
    TreeImage("Cloud", "x86_64", EC2_X86, sha256="AB" * 32),
    TreeImage("Cloud", "aarch64", EC2_ARM, sha256="cd" * 32),
    TreeImage(
        "Cloud",
        "x86_64",
        "Cloud/x86_64/images/Fedora-Cloud-Base-Generic-41-20250101.0.x86_64.qcow2",
        type="qcow2",
        format="qcow2",
    ),
    TreeImage(
        "Cloud",
        "ppc64le",
        "Cloud/ppc64le/images/Fedora-Cloud-Base-41-20250101.0.ppc64le.raw.xz",
    ),
    TreeImage(
        "Server",
        "x86_64",
        "Server/x86_64/images/Fedora-Server-41-20250101.0.x86_64.raw.xz",
        subvariant="Server",
    ),
    TreeImage(
        "AtomicHost",
        "x86_64",
        "AtomicHost/x86_64/images/Fedora-AtomicHost-41-20250101.0.x86_64.raw.xz",
        subvariant="AtomicHost",
    ),
]


@pytest.fixture
def tree(tmp_path: Path) -> ComposeTree:
    return build_compose_tree(tmp_path, COMPOSE_ID, ENTRIES)


@pytest.fixture
def served(tree: ComposeTree) -> Iterator[str]:
    """The compose/ URL of the tree, served over HTTP."""
    with serve_directory(tree.root) as base:
        yield f"{base}/{COMPOSE_ID}/compose"


def names(compose_images: tuple[ComposeImage, ...]) -> list[str]:
    return [image.file_name for image in compose_images]


def test_the_default_selection_is_raw_xz_cloud_base_and_atomichost_on_x86_64_and_aarch64(
    served: str,
) -> None:
    compose = load_compose(served, ComposeSettings())
    assert compose.compose_id == COMPOSE_ID
    assert compose.release == "41"
    assert compose.location == served
    assert names(compose.images) == [
        "Fedora-AtomicHost-41-20250101.0.x86_64.raw.xz",
        "Fedora-Cloud-Base-AmazonEC2.aarch64-41-20250101.0.raw.xz",
        "Fedora-Cloud-Base-AmazonEC2.x86_64-41-20250101.0.raw.xz",
    ]
    x86 = compose.images[2]
    assert x86.url == f"{served}/{EC2_X86}"
    assert x86.sha256 == "ab" * 32
    assert (x86.variant, x86.arch, x86.subvariant, x86.type) == (
        "Cloud",
        "x86_64",
        "Cloud_Base",
        "raw-xz",
    )


def test_the_selection_follows_the_config(served: str) -> None:
    settings = ComposeSettings(
        subvariants=["Cloud_Base", "Server"], arches=["x86_64"], variants=["Server"]
    )
    compose = load_compose(served, settings)
    assert names(compose.images) == ["Fedora-Server-41-20250101.0.x86_64.raw.xz"]


@pytest.mark.parametrize("suffix", ["/compose", "/compose/", "", "/compose/metadata/images.json"])
def test_a_compose_is_found_from_its_compose_dir_its_top_dir_or_its_images_json(
    tree: ComposeTree, suffix: str
) -> None:
    with serve_directory(tree.root) as base:
        location, text = find_metadata(f"{base}/{COMPOSE_ID}{suffix}", ComposeSettings())
        assert location == f"{base}/{COMPOSE_ID}/compose"
        assert COMPOSE_ID in text


def test_a_local_compose_directory_works_like_a_url(tree: ComposeTree) -> None:
    compose = load_compose(str(tree.compose_dir), ComposeSettings())
    assert compose.location == str(tree.compose_dir)
    assert compose.images[-1].url == str(tree.compose_dir / EC2_X86)


def test_a_compose_without_metadata_is_an_error_at_once(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with serve_directory(tmp_path) as base, pytest.raises(ComposeError, match="no image metadata"):
        load_compose(f"{base}/nothing/compose", ComposeSettings(), sleep=sleeps.append)
    assert sleeps == []  # a 404 is an answer, not a reason to try again


class _Failing(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_error(503)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_server_errors_are_retried_then_reported() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sleeps: list[float] = []
    try:
        with pytest.raises(ComposeError, match=r"HTTP 503 \(after 2 attempts\)"):
            find_metadata(
                f"http://127.0.0.1:{server.server_address[1]}/c/compose",
                ComposeSettings(metadata_attempts=2),
                sleep=sleeps.append,
            )
    finally:
        server.shutdown()
        server.server_close()
    assert sleeps == [1.0]
    assert _Failing.hits == 2


@pytest.mark.parametrize("content", ["not json", '{"header": {"type": "productmd.rpms"}}', "[]"])
def test_metadata_that_is_not_productmd_images_is_an_error(tmp_path: Path, content: str) -> None:
    metadata = tmp_path / "compose" / "metadata" / "images.json"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(content)
    with pytest.raises(ComposeError, match="not productmd image metadata"):
        load_compose(str(tmp_path / "compose"), ComposeSettings())


def test_the_message_compose_id_and_release_win_over_the_metadata(served: str) -> None:
    compose = load_compose(
        served, ComposeSettings(), compose_id="Fedora-41-20250101.1", release="41"
    )
    assert compose.compose_id == "Fedora-41-20250101.1"
    assert compose.release == "41"


@pytest.mark.parametrize(
    ("compose_id", "release"),
    [
        ("Fedora-40-20240414.0", "40"),
        ("Fedora-Cloud-40-20240414.0", "40"),
        ("Fedora-Rawhide-20240101.n.0", "Rawhide"),
        ("Fedora-Atomic-25-20170206.0", "25"),
        ("something-else", None),
    ],
)
def test_the_release_comes_from_the_compose_id(compose_id: str, release: str | None) -> None:
    assert release_from_compose_id(compose_id) == release


def test_fedora_28_cloud_and_atomichost_variants(reference_dir: Path) -> None:
    images_json = reference_dir / "compose" / "Fedora-28-20180425.0" / "images.json"
    compose = load_compose(str(images_json), ComposeSettings())
    assert compose.compose_id == "Fedora-28-20180425.0"
    assert compose.release == "28"
    assert [(i.variant, i.arch, i.file_name) for i in compose.images] == [
        ("AtomicHost", "aarch64", "Fedora-AtomicHost-28-1.1.aarch64.raw.xz"),
        ("AtomicHost", "x86_64", "Fedora-AtomicHost-28-1.1.x86_64.raw.xz"),
        ("Cloud", "aarch64", "Fedora-Cloud-Base-28-1.1.aarch64.raw.xz"),
        ("Cloud", "x86_64", "Fedora-Cloud-Base-28-1.1.x86_64.raw.xz"),
    ]
    assert all(image.sha256 and len(image.sha256) == 64 for image in compose.images)


def test_fedora_40_amazon_ec2_images(reference_dir: Path) -> None:
    images_json = reference_dir / "compose" / "Fedora-40-20240414.0" / "images.json"
    compose = load_compose(str(images_json), ComposeSettings())
    assert compose.release == "40"
    assert [i.file_name for i in compose.images] == [
        "Fedora-Cloud-Base-AmazonEC2.aarch64-40-1.14.raw.xz",
        "Fedora-Cloud-Base-AmazonEC2.x86_64-40-1.14.raw.xz",
    ]


def test_older_cloudimages_variant_is_found_by_subvariant(tmp_path: Path) -> None:
    # Up to F27 the cloud images lived in a variant of their own, CloudImages.
    tree = build_compose_tree(
        tmp_path,
        "Fedora-27-20171105.0",
        [
            TreeImage(
                "CloudImages",
                "x86_64",
                "CloudImages/x86_64/images/Fedora-Cloud-Base-27-1.6.x86_64.raw.xz",
            )
        ],
    )
    compose = load_compose(str(tree.compose_dir), ComposeSettings())
    assert [(i.variant, i.file_name) for i in compose.images] == [
        ("CloudImages", "Fedora-Cloud-Base-27-1.6.x86_64.raw.xz")
    ]
    assert compose.release == "27"
