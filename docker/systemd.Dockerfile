# docker/systemd.Dockerfile — a "fresh machine" with systemd as PID 1, for
# tests/readme_setup.sh (README's "Setting up a main and a branch" followed
# as written, with the packaged unit file). Built on the local base image
# (docker/build.sh --base-only: Debian bookworm + PostgreSQL 15); nothing is
# pulled from a registry, apt reaches the base image's Debian mirror.
#
#   docker build -t branchsync-systemd:local - <docker/systemd.Dockerfile
ARG BASE=branchsync-base:local
FROM ${BASE}
# A real machine's PATH: the base image adds PostgreSQL's bin directory,
# which a Debian machine does not have (its pg_* are postgresql-common's
# wrappers in /usr/bin).
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV container=docker
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      systemd systemd-sysv sudo dbus procps passwd coreutils >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 # Units that have nothing to do in a container (no consoles, no udev, no
 # kernel to tune) and only slow the boot or fail.
 && systemctl mask getty.target console-getty.service systemd-udevd.service \
      systemd-udev-trigger.service systemd-modules-load.service \
      systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
      sys-kernel-tracing.mount systemd-firstboot.service systemd-logind.service \
 && : >/etc/machine-id
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
