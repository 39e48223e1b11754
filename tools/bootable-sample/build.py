#!/usr/bin/env python3
"""Build the bootable sample disk image (issue 9).

A small MBR disk image, made from Debian packages without root, loop devices
or mounts, that really boots under QEMU and offers SSH:

* partition 1 (active, FAT16, starts at 1 MiB) holds syslinux (installed with
  ``syslinux --install`` through mtools), a Debian kernel from the
  ``linux-image-*`` package (downloaded with ``apt-get download`` and unpacked
  with ``dpkg-deb -x``) and an initramfs built here;
* the MBR boot code is syslinux's ``mbr.bin``;
* the initramfs (a gzip'd newc cpio written by this script) is the whole
  system: busybox-static, dropbear with its shared libraries (found with
  ``ldd``), OpenSSH's sftp-server, the virtio/vfat/iso9660 modules with their
  dependencies, and the scripts under ``overlay/`` — ``/init`` and
  ``/etc/init.d/rcS``, a tiny stand-in for cloud-init's NoCloud datasource
  that installs root's ``ssh_authorized_keys`` from the seed, prints the SSH
  host key to the console like cloud-init and starts dropbear on port 22.

Usage::

    tools/bootable-sample/build.py --out DIR      # -> DIR/bootable-sample.raw{,.xz}
    tools/bootable-sample/build.py --check-deps   # exit 1 listing what is missing

The paths of the images are printed on stdout, one per line; progress goes to
stderr. A build is reused when its inputs (kernel package and version, the
host packages and files copied into the image, this script and the overlay)
are unchanged; ``DIR/bootable-sample.json`` records them.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OVERLAY = HERE / "overlay"
INSTALL_DEPS = HERE / "install-deps.sh"

DEFAULT_NAME = "bootable-sample"
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
KERNEL_CMDLINE = "console=ttyS0,115200n8 panic=30"
MANIFEST_FORMAT = 1

SECTOR = 512
PART_START = 2048  # sectors: the FAT partition starts at 1 MiB
MIB = 1024 * 1024
MBR_PATHS = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
SFTP_SERVER_PATHS = ("/usr/lib/openssh/sftp-server",)

# Kernel modules for QEMU's virtio devices and the NoCloud seed's file
# systems; the build fails if one is neither a module nor built in.
REQUIRED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vfat",
    "isofs",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
)
# Nice to have (entropy, other hypervisors' disks and NICs): skipped if absent.
OPTIONAL_MODULES = (
    "virtio_rng",
    "virtio_scsi",
    "nls_iso8859_1",
    "nvme",
    "ena",
)

# Debian packages whose versions are recorded with (and key) a build.
RECORDED_PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    "openssh-sftp-server",
    "syslinux",
    "syslinux-common",
    "dosfstools",
    "mtools",
    "xz-utils",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
)


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- dependencies


@dataclass(frozen=True)
class Requirement:
    """One tool or file the build (or the boot test) needs, and its package."""

    what: str
    package: str
    command: str | None = None
    paths: tuple[str, ...] = ()
    test_only: bool = False

    def found(self) -> str | None:
        if self.command is not None:
            return shutil.which(self.command, path=_search_path())
        for candidate in self.paths:
            if os.path.exists(candidate):
                return candidate
        return None


def _search_path() -> str:
    extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"]
    return os.pathsep.join([os.environ.get("PATH", os.defpath), *extra])


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("syslinux (mtools installer)", "syslinux", command="syslinux"),
    Requirement("syslinux MBR code (mbr.bin)", "syslinux-common", paths=MBR_PATHS),
    Requirement("mkfs.fat", "dosfstools", command="mkfs.fat"),
    Requirement("mcopy", "mtools", command="mcopy"),
    Requirement("busybox, statically linked", "busybox-static", paths=BUSYBOX_PATHS),
    Requirement("dropbear", "dropbear-bin", command="dropbear"),
    Requirement("dropbearkey", "dropbear-bin", command="dropbearkey"),
    Requirement("sftp-server", "openssh-sftp-server", paths=SFTP_SERVER_PATHS),
    Requirement("xz", "xz-utils", command="xz"),
    Requirement("apt-get", "apt", command="apt-get"),
    Requirement("apt-cache", "apt", command="apt-cache"),
    Requirement("dpkg-deb", "dpkg", command="dpkg-deb"),
    Requirement("dpkg-query", "dpkg", command="dpkg-query"),
    Requirement("ldd", "libc-bin", command="ldd"),
    Requirement(
        "qemu-system-x86_64", "qemu-system-x86", command="qemu-system-x86_64", test_only=True
    ),
    Requirement("ssh", "openssh-client", command="ssh", test_only=True),
    Requirement("ssh-keygen", "openssh-client", command="ssh-keygen", test_only=True),
)


def missing_requirements(include_test: bool) -> list[str]:
    """Human-readable lines, one per missing tool; empty when all is there."""
    missing: list[str] = []
    for req in REQUIREMENTS:
        if req.test_only and not include_test:
            continue
        where = req.found()
        if where is None:
            missing.append(f"{req.what}: install Debian package {req.package}")
        elif req.package == "busybox-static" and not is_static_elf(Path(where)):
            missing.append(
                f"{req.what}: {where} is dynamically linked; install Debian package busybox-static"
            )
    return missing


def check_deps(include_test: bool) -> int:
    missing = missing_requirements(include_test)
    if not missing:
        print("build.py: all dependencies are installed", file=sys.stderr)
        return 0
    packages = sorted({line.rsplit(" ", 1)[-1] for line in missing})
    print("build.py: missing dependencies:", file=sys.stderr)
    for line in missing:
        print(f"  - {line}", file=sys.stderr)
    print(
        f"build.py: install them with: apt-get install {' '.join(packages)}\n"
        f"          (or, as root: {INSTALL_DEPS}{'' if include_test else ' --build-only'})",
        file=sys.stderr,
    )
    return 1


# ------------------------------------------------------------------ processes


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command, return its stdout; raise BuildError with its stderr."""
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(
        [os.fspath(a) for a in args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        cmd = " ".join(os.fspath(a) for a in args)
        raise BuildError(
            f"`{cmd}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------ ELF


def _elf_header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("not a little-endian 64-bit ELF file")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from(
        "<HHHHH", data, 0x36
    )
    return e_phoff, e_phentsize, e_phnum, e_shoff, e_shentsize, e_shnum, e_shstrndx


def is_static_elf(path: Path) -> bool:
    """True if the ELF file has no program interpreter (PT_INTERP)."""
    data = path.read_bytes()
    try:
        phoff, phentsize, phnum, *_ = _elf_header(data)
    except BuildError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module: key -> values."""
    _, _, _, shoff, shentsize, shnum, shstrndx = _elf_header(data)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name,) = struct.unpack_from("<I", data, base)
        (offset, size) = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, strtab_off, strtab_size = section(shstrndx)
    strtab = data[strtab_off : strtab_off + strtab_size]
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name_off, offset, size = section(index)
        name = strtab[name_off : strtab.index(b"\0", name_off)]
        if name != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            if b"=" in entry:
                key, _, value = entry.decode("utf-8", "replace").partition("=")
                info.setdefault(key, []).append(value)
    return info


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


# ---------------------------------------------------------------------- cpio


@dataclass
class Cpio:
    """A newc ("070701") cpio archive, as the kernel unpacks an initramfs.

    Written here so that device nodes and root ownership need no privileges.
    """

    chunks: list[bytes] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    next_ino: int = 1

    def _entry(
        self,
        path: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        name = path.lstrip("/").encode() + b"\0"
        fields = (
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name),
            0,
        )
        self.next_ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.chunks.append(header + name + b"\0" * (-(len(header) + len(name)) % 4))
        if data:
            self.chunks.append(data + b"\0" * (-len(data) % 4))

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.mkdir("/".join(parts[:i]))

    def root(self, mode: int = 0o755) -> None:
        """Set the mode of / itself (the kernel's rootfs is 1777 otherwise)."""
        self._entry(".", stat.S_IFDIR | mode, nlink=2)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self.paths:
            return
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if path in self.paths:
            raise BuildError(f"initramfs: {path} added twice")
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if path in self.paths:
            return
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        raw = b"".join(self.chunks)
        return raw + b"\0" * (-len(raw) % 512)


# -------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class KernelSource:
    package: str
    version: str
    deb: Path | None  # a local .deb given with --kernel-deb; None: apt-get download


def apt_record(package: str) -> dict[str, str]:
    """The candidate version's record of a package from the local apt lists."""
    try:
        text = run(["apt-cache", "show", "--no-all-versions", package])
    except BuildError as err:
        raise BuildError(
            f"apt knows no package {package} (run `apt-get update` first?): {err}"
        ) from err
    record: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if line[:1] not in (" ", "\t") and ":" in line:
            key, _, value = line.partition(":")
            record[key] = value.strip()
    if "Version" not in record:
        raise BuildError(f"no installable version of {package} (run `apt-get update`?)")
    return record


def resolve_kernel(package: str, deb: Path | None) -> KernelSource:
    if deb is not None:
        fields = run(["dpkg-deb", "-f", deb, "Package", "Version"])
        values = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
        return KernelSource(values["Package"], values["Version"], deb.resolve())
    record = apt_record(package)
    # A metapackage (linux-image-cloud-amd64) depends on the real one.
    for _ in range(3):
        if re.match(r"linux-image-\d", record["Package"]):
            break
        deps = re.findall(r"(linux-image-\d[^\s,(|]*)", record.get("Depends", ""))
        if not deps:
            raise BuildError(f"{record['Package']} is not a linux-image package")
        record = apt_record(deps[0])
    return KernelSource(record["Package"], record["Version"], None)


def fetch_kernel_deb(kernel: KernelSource, cache: Path) -> Path:
    if kernel.deb is not None:
        return kernel.deb
    cache.mkdir(parents=True, exist_ok=True)
    quoted = kernel.version.replace(":", "%3a")
    wanted = cache / f"{kernel.package}_{quoted}_amd64.deb"
    if wanted.exists():
        return wanted
    log(f"downloading {kernel.package}={kernel.version} with apt-get download")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)
        run(["apt-get", "download", f"{kernel.package}={kernel.version}"], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download left {len(debs)} .deb files")
        os.replace(debs[0], wanted)
    for old in cache.glob("linux-image-*.deb"):
        if old != wanted:
            old.unlink()
    return wanted


def ldd(binary: Path) -> list[Path]:
    """Shared objects (and the dynamic loader) that a binary needs."""
    libs: list[Path] = []
    for raw_line in run(["ldd", binary]).splitlines():
        line = raw_line.strip()
        match = re.match(r"\S+ => (/\S+) \(0x[0-9a-f]+\)$", line) or re.match(
            r"(/\S+) \(0x[0-9a-f]+\)$", line
        )
        if match:
            libs.append(Path(match.group(1)))
        elif "not found" in line:
            raise BuildError(f"{binary}: {line}")
    return libs


def first_existing(paths: Iterable[str]) -> Path:
    for candidate in paths:
        if os.path.exists(candidate):
            return Path(candidate)
    raise BuildError(f"none of {', '.join(paths)} exists")


@dataclass(frozen=True)
class HostFiles:
    busybox: Path
    dropbear: Path
    dropbearkey: Path
    sftp_server: Path
    mbr: Path
    libraries: tuple[Path, ...]

    def all(self) -> list[Path]:
        return [
            self.busybox,
            self.dropbear,
            self.dropbearkey,
            self.sftp_server,
            self.mbr,
            *self.libraries,
        ]


def host_files() -> HostFiles:
    def which(name: str) -> Path:
        found = shutil.which(name, path=_search_path())
        if found is None:
            raise BuildError(f"{name} not found")
        return Path(found)

    dropbear, dropbearkey = which("dropbear"), which("dropbearkey")
    sftp_server = first_existing(SFTP_SERVER_PATHS)
    libraries: dict[Path, None] = {}
    for binary in (dropbear, dropbearkey, sftp_server):
        libraries.update(dict.fromkeys(ldd(binary)))
    busybox = first_existing(BUSYBOX_PATHS)
    if not is_static_elf(busybox):
        raise BuildError(f"{busybox} is not statically linked: install busybox-static")
    return HostFiles(
        busybox, dropbear, dropbearkey, sftp_server, first_existing(MBR_PATHS), tuple(libraries)
    )


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    versions = dict.fromkeys(packages, "not-installed")
    for line in proc.stdout.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status == "installed":
            versions[name.split(":")[0]] = version
    return versions


def script_digest() -> str:
    digest = hashlib.sha256()
    for path in [Path(__file__).resolve(), *sorted(p for p in OVERLAY.rglob("*") if p.is_file())]:
        digest.update(str(path.relative_to(HERE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_inputs(kernel: KernelSource, files: HostFiles) -> dict[str, object]:
    kernel_input: dict[str, str] = {"package": kernel.package, "version": kernel.version}
    if kernel.deb is not None:
        kernel_input["deb_sha256"] = sha256_file(kernel.deb)
    return {
        "format": MANIFEST_FORMAT,
        "script_sha256": script_digest(),
        "kernel": kernel_input,
        "cmdline": KERNEL_CMDLINE,
        "packages": package_versions(RECORDED_PACKAGES),
        "files": {str(p): sha256_file(p) for p in files.all()},
    }


def inputs_key(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------- initramfs


@dataclass(frozen=True)
class KernelTree:
    release: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/<release>


def unpack_kernel(deb: Path, dest: Path) -> KernelTree:
    log(f"unpacking {deb.name}")
    run(["dpkg-deb", "-x", deb, dest])
    images = sorted((dest / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise BuildError(f"{deb.name}: expected one boot/vmlinuz-*, found {len(images)}")
    release = images[0].name.removeprefix("vmlinuz-")
    for base in ("lib/modules", "usr/lib/modules"):
        modules = dest / base / release
        if modules.is_dir():
            return KernelTree(release, images[0], modules)
    raise BuildError(f"{deb.name}: no modules directory for {release}")


def select_modules(tree: KernelTree) -> list[str]:
    """Paths (relative to the modules dir) of the modules to load, in order."""
    index: dict[str, Path] = {}
    for path in tree.modules.rglob("*.ko*"):
        index.setdefault(module_name(path.name), path)
    builtin_file = tree.modules / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency loop: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise BuildError(f"kernel {tree.release} has no module {name}")
        if path.suffix != ".ko":
            raise BuildError(f"{path.name}: compressed modules are not supported")
        info = read_modinfo(path.read_bytes())
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(module_name(dep), (*chain, name))
        seen.add(name)
        order.append(str(path.relative_to(tree.modules)))

    for name in REQUIRED_MODULES:
        if name not in builtin and name not in index:
            raise BuildError(f"kernel {tree.release} lacks required module {name}")
        visit(name, ())
    for name in OPTIONAL_MODULES:
        if name in index or name in builtin:
            visit(name, ())
    return order


def build_initramfs(tree: KernelTree, files: HostFiles) -> bytes:
    cpio = Cpio()
    cpio.root()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
        "var/log",
        "mnt",
        "root",
    ):
        cpio.mkdir(d, 0o700 if d == "root" else 0o755)
    cpio.mkdir("tmp", 0o1777)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3, 0o666)
    cpio.add_symlink("var/run", "/run")

    cpio.add_file("bin/busybox", files.busybox.read_bytes(), 0o755)
    for applet in run([files.busybox, "--list-full"]).split():
        if applet.split("/")[0] in ("bin", "sbin", "usr") and applet != "bin/busybox":
            cpio.add_symlink(applet, "/bin/busybox")

    cpio.add_file("usr/sbin/dropbear", files.dropbear.read_bytes(), 0o755)
    cpio.add_file("usr/bin/dropbearkey", files.dropbearkey.read_bytes(), 0o755)
    # Debian's dropbear runs /usr/lib/sftp-server for the "sftp" subsystem
    # (and so for OpenSSH >= 9's scp, which speaks SFTP).
    cpio.add_file("usr/lib/openssh/sftp-server", files.sftp_server.read_bytes(), 0o755)
    cpio.add_symlink("usr/lib/sftp-server", "openssh/sftp-server")
    for lib in files.libraries:
        cpio.add_file(str(lib), lib.resolve().read_bytes(), 0o755)

    modules = select_modules(tree)
    moddir = f"lib/modules/{tree.release}"
    for rel in modules:
        cpio.add_file(f"{moddir}/{rel}", (tree.modules / rel).read_bytes())
    cpio.add_file(f"{moddir}/modules.dep", modules_dep(tree, modules).encode())
    cpio.add_file("etc/bootable-sample/modules", "".join(f"{m}\n" for m in modules).encode())
    log(f"kernel {tree.release}: modules {', '.join(module_name(m) for m in modules)}")

    for path in sorted(OVERLAY.rglob("*")):
        rel = str(path.relative_to(OVERLAY))
        if path.is_dir():
            cpio.mkdir(rel)
        else:
            data = path.read_bytes()
            cpio.add_file(rel, data, 0o755 if data.startswith(b"#!") else 0o644)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


def modules_dep(tree: KernelTree, modules: list[str]) -> str:
    """A modules.dep for the selected modules (so busybox modprobe works too)."""
    by_name = {module_name(rel): rel for rel in modules}
    direct = {
        rel: [
            by_name[module_name(d)]
            for d in ",".join(
                read_modinfo((tree.modules / rel).read_bytes()).get("depends", [])
            ).split(",")
            if d and module_name(d) in by_name
        ]
        for rel in modules
    }
    lines = []
    for rel in modules:
        needed: set[str] = set()
        todo = list(direct[rel])
        while todo:
            dep = todo.pop()
            if dep not in needed:
                needed.add(dep)
                todo.extend(direct[dep])
        # modprobe loads the listed dependencies from last to first.
        deps = [m for m in reversed(modules) if m in needed]
        lines.append(f"{rel}:{''.join(' ' + d for d in deps)}\n")
    return "".join(lines)


# ---------------------------------------------------------------------- disk


def chs(lba: int) -> bytes:
    heads, sectors = 255, 63
    cyl, rest = divmod(lba, heads * sectors)
    if cyl > 1023:
        return bytes((254, 0xFF, 0xFF))
    head, sec = divmod(rest, sectors)
    return bytes((head, ((sec + 1) & 0x3F) | ((cyl >> 2) & 0xC0), cyl & 0xFF))


def write_mbr(disk: Path, mbr_code: bytes, part_sectors: int, signature: int) -> None:
    if len(mbr_code) < 440:
        raise BuildError("mbr.bin is shorter than 440 bytes")
    last = PART_START + part_sectors - 1
    entry = (
        b"\x80"
        + chs(PART_START)
        + b"\x0e"
        + chs(last)
        + struct.pack("<II", PART_START, part_sectors)
    )
    sector = mbr_code[:440] + struct.pack("<IH", signature, 0) + entry + bytes(48) + b"\x55\xaa"
    with disk.open("r+b") as f:
        f.write(sector)


def syslinux_cfg(release: str) -> str:
    return (
        "SERIAL 0 115200\n"
        "DEFAULT sample\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        f"SAY bootable-sample: booting Linux {release}\n"
        "LABEL sample\n"
        "  LINUX /vmlinuz\n"
        "  INITRD /initrd.gz\n"
        f"  APPEND {KERNEL_CMDLINE}\n"
    )


def build_disk(
    disk: Path, work: Path, tree: KernelTree, initrd: bytes, *, mbr: Path, signature: int
) -> None:
    initrd_path = work / "initrd.gz"
    initrd_path.write_bytes(initrd)
    cfg = work / "syslinux.cfg"
    cfg.write_text(syslinux_cfg(tree.release))
    payload = tree.vmlinuz.stat().st_size + len(initrd)
    part_mib = max(16, -(-payload // MIB) + 4)
    part_sectors = part_mib * MIB // SECTOR
    with disk.open("wb") as f:
        f.truncate((PART_START + part_sectors) * SECTOR)
    run(
        [
            "mkfs.fat",
            "-F",
            "16",
            "-n",
            "SAMPLEBOOT",
            "-i",
            f"{signature:08x}",
            "-h",
            str(PART_START),
            f"--offset={PART_START}",
            "--mbr=n",
            disk,
            str(part_sectors * SECTOR // 1024),
        ]
    )
    image = f"{disk}@@{PART_START * SECTOR}"
    mtools_env = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    for src, name in ((tree.vmlinuz, "vmlinuz"), (initrd_path, "initrd.gz"), (cfg, "syslinux.cfg")):
        run(["mcopy", "-i", image, src, f"::/{name}"], env=mtools_env)
    run(["syslinux", "--offset", str(PART_START * SECTOR), "--install", disk])
    write_mbr(disk, mbr.read_bytes(), part_sectors, signature)


# --------------------------------------------------------------------- build


@dataclass(frozen=True)
class Outputs:
    raw: Path
    xz: Path
    manifest: Path

    def wanted(self, fmt: str) -> list[Path]:
        return {"raw": [self.raw], "xz": [self.xz], "both": [self.raw, self.xz]}[fmt]


def cached(outputs: Outputs, key: str, fmt: str) -> dict[str, object] | None:
    try:
        manifest: dict[str, object] = json.loads(outputs.manifest.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    sizes = manifest.get("sizes")
    if not isinstance(sizes, dict):
        return None
    for path in outputs.wanted(fmt):
        if not path.exists() or sizes.get(path.name) != path.stat().st_size:
            return None
    return manifest


def build(
    out: Path, *, name: str, fmt: str, kernel_package: str, kernel_deb: Path | None, force: bool
) -> list[Path]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(out / f"{name}.raw", out / f"{name}.raw.xz", out / f"{name}.json")
    with (out / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = resolve_kernel(kernel_package, kernel_deb)
        files = host_files()
        inputs = build_inputs(kernel, files)
        key = inputs_key(inputs)
        if not force and (manifest := cached(outputs, key, fmt)) is not None:
            log(
                f"inputs unchanged (key {key[:12]}): reusing the build of "
                f"{manifest.get('built_at')}"
            )
            return outputs.wanted(fmt)

        deb = fetch_kernel_deb(kernel, out / "debs")
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out) as tmp:
            work = Path(tmp)
            tree = unpack_kernel(deb, work / "kernel")
            initrd = build_initramfs(tree, files)
            log(f"initramfs: {len(initrd) / MIB:.1f} MiB gzip'd")
            shutil.rmtree(work / "kernel" / "lib", ignore_errors=True)
            shutil.rmtree(work / "kernel" / "usr", ignore_errors=True)
            disk = work / outputs.raw.name
            build_disk(disk, work, tree, initrd, mbr=files.mbr, signature=int(key[:8], 16))
            sizes = {outputs.raw.name: disk.stat().st_size}
            if fmt in ("xz", "both"):
                log("compressing with xz -T0")
                run(["xz", "-T0", "-k", "-f", disk])
                xz = disk.with_name(disk.name + ".xz")
                sizes[outputs.xz.name] = xz.stat().st_size
                os.replace(xz, outputs.xz)
            else:
                outputs.xz.unlink(missing_ok=True)
            if fmt in ("raw", "both"):
                os.replace(disk, outputs.raw)
            else:
                outputs.raw.unlink(missing_ok=True)
        manifest = {
            "key": key,
            "inputs": inputs,
            "kernel_release": tree.release,
            "sizes": sizes,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        outputs.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        log(
            f"built in {manifest['build_seconds']} s: "
            + ", ".join(f"{n} {s / MIB:.1f} MiB" for n, s in sizes.items())
        )
        return outputs.wanted(fmt)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a small disk image (syslinux, Debian kernel, busybox, dropbear) "
        "that boots under QEMU, reads a NoCloud seed and offers SSH.",
    )
    parser.add_argument("--out", type=Path, help="output (and cache) directory")
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help="image base name (default: %(default)s)"
    )
    parser.add_argument(
        "--format",
        choices=("raw", "xz", "both"),
        default="both",
        help="NAME.raw, NAME.raw.xz or both (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-package",
        default=DEFAULT_KERNEL_PACKAGE,
        help="Debian kernel package or metapackage (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-deb", type=Path, help="use this linux-image .deb instead of apt-get download"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--check-deps", action="store_true", help="only check that the build's tools are installed"
    )
    parser.add_argument(
        "--test-deps",
        action="store_true",
        help="with --check-deps: also the boot test's (qemu, ssh)",
    )
    args = parser.parse_args(argv)
    if not args.check_deps and args.out is None:
        parser.error("--out DIR is required (or --check-deps)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_deps:
        return check_deps(args.test_deps)
    missing = missing_requirements(include_test=False)
    if missing:
        return check_deps(include_test=False)
    try:
        paths = build(
            args.out.resolve(),
            name=args.name,
            fmt=args.format,
            kernel_package=args.kernel_package,
            kernel_deb=args.kernel_deb,
            force=args.force,
        )
    except BuildError as err:
        log(f"error: {err}")
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
