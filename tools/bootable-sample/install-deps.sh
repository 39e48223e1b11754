#!/bin/sh
# Install (as root) the Debian packages that tools/bootable-sample/build.py
# needs, and those of its boot test (tests/test_bootable_sample.py).
#
#   tools/bootable-sample/install-deps.sh               # build + boot test
#   tools/bootable-sample/install-deps.sh --build-only  # build.py only
#
# build.py itself runs unprivileged; it fetches the kernel at build time with
# `apt-get download` (linux-image-cloud-amd64's current version), which needs
# up-to-date apt lists: this script runs `apt-get update` first.
set -eu

# syslinux            syslinux --install (through mtools) into the FAT partition
# syslinux-common     mbr.bin, the MBR boot code
# mtools              mcopy, used by syslinux too
# dosfstools          mkfs.fat
# busybox-static      the userland of the image (sh, udhcpc, findfs, init, ...)
# dropbear-bin        the SSH server and dropbearkey (no service is started)
# openssh-sftp-server sftp-server for the image (SFTP, and OpenSSH 9's scp)
# xz-utils            xz -T0 for NAME.raw.xz
BUILD_PACKAGES="syslinux syslinux-common mtools dosfstools busybox-static dropbear-bin \
openssh-sftp-server xz-utils"
# qemu-system-x86     qemu-system-x86_64 (TCG) to boot the image
# openssh-client      ssh and ssh-keygen for the login test
TEST_PACKAGES="qemu-system-x86 openssh-client"

packages="$BUILD_PACKAGES $TEST_PACKAGES"
case "${1:-}" in
    --build-only) packages=$BUILD_PACKAGES ;;
    "") ;;
    *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "$0: must run as root (apt-get install)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $packages
