#!/usr/bin/env bash
# Build a CUDA-aware Open MPI 4.1.x from Debian's source package and pack it
# so it can be carried to a GPU machine (issue 8; docs/cuda-aware-mpi.md).
#
#   scripts/build-cuda-mpi.sh            # from the repo root, as root (apt)
#
# Steps: (1) add a bookworm deb-src entry if none, install the build tools;
# (2) `apt-get source openmpi` (4.1.4-3 in bookworm, soname libmpi.so.40, the
# same ABI series as the GPU image's Open MPI 4.1.6); (3) unpack with Debian's
# patches and regenerate the build system like debian/rules does
# (./autogen.pl --force); (4) configure with CUDA (headers only: libcuda.so.1
# is dlopen'ed at run time), internal libevent/hwloc/pmix, no Fortran/Java/
# OSHMEM/UCX/verbs/OFI; (5) make install into $PREFIX, strip, drop what is not
# needed at run time; (6) check `ompi_info` says CUDA support is built in;
# (7) pack $PREFIX as $TARBALL (xz, deterministic tar) and print its size.
#
# Environment (all optional):
#   PREFIX        install prefix              (default: <repo>/build/cuda-mpi)
#   CUDA_HOME     CUDA toolkit with include/cuda.h (default: /usr/local/cuda)
#   JOBS          parallel make jobs          (default: nproc)
#   WORK          scratch dir (sources, objs) (default: <repo>/build/cuda-mpi-work)
#   TARBALL       output archive              (default: <repo>/build/cuda-mpi.tar.xz)
#   OMPI_DEB_VERSION  Debian source version   (default: 4.1.4-3, bookworm)
#   SRC_TARBALL   a source tree already unpacked+autogen'ed (made by this
#                 script as $WORK/openmpi-src-autogen.tar.xz); when set, apt
#                 and autotools are not used at all (for building on a machine
#                 without network, e.g. the GPU machine)
#   SKIP_APT=1    do not touch apt (tools and source must already be there)
#   XZ_LEVEL      xz compression level        (default: 9)
#
# Idempotent: every run starts from a fresh object dir and a fresh $PREFIX;
# the downloaded/autogen'ed source is reused when its stamp matches.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-$REPO/build/cuda-mpi}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
JOBS="${JOBS:-$(nproc)}"
WORK="${WORK:-$REPO/build/cuda-mpi-work}"
TARBALL="${TARBALL:-$REPO/build/cuda-mpi.tar.xz}"
OMPI_DEB_VERSION="${OMPI_DEB_VERSION:-4.1.4-3}"
SRC_TARBALL="${SRC_TARBALL:-}"
SKIP_APT="${SKIP_APT:-0}"
XZ_LEVEL="${XZ_LEVEL:-9}"

log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'build-cuda-mpi: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit $?)"' ERR

PREFIX="$(realpath -m "$PREFIX")"
WORK="$(realpath -m "$WORK")"
TARBALL="$(realpath -m "$TARBALL")"
[[ -f "$CUDA_HOME/include/cuda.h" ]] || die "no $CUDA_HOME/include/cuda.h (set CUDA_HOME)"
mkdir -p "$WORK" "$(dirname "$TARBALL")"
T0=$(date +%s)

SRC="$WORK/openmpi-src"            # patched + autogen'ed source tree
STAMP="$SRC/.hpcattn-stamp"        # which Debian version it holds

# --- 1+2+3. source tree ------------------------------------------------------
if [[ -n "$SRC_TARBALL" ]]; then
    # Offline path: the tree was prepared (patched, autogen'ed) elsewhere.
    log "using prepared source $SRC_TARBALL"
    rm -rf "$SRC"; mkdir -p "$SRC"
    tar -C "$SRC" --strip-components=1 -xf "$SRC_TARBALL"
elif [[ -f "$STAMP" && "$(cat "$STAMP")" == "$OMPI_DEB_VERSION autogen" ]]; then
    log "reusing source tree $SRC ($OMPI_DEB_VERSION)"
else
    if [[ "$SKIP_APT" != 1 ]]; then
        export DEBIAN_FRONTEND=noninteractive
        # deb-src for bookworm main, only if no deb-src entry is configured.
        if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            log "adding deb-src entry for bookworm main"
            cat > /etc/apt/sources.list.d/bookworm-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        fi
        log "apt-get update + build tools"
        apt-get update -qq
        # Tools debian/rules uses to regenerate the build system, plus the
        # compilers; no -dev libraries: libevent/hwloc/pmix are the bundled ones.
        apt-get install -y -qq --no-install-recommends \
            build-essential dpkg-dev autoconf automake libtool flex perl \
            pkg-config xz-utils file binutils >/dev/null
    fi
    log "apt-get source openmpi=$OMPI_DEB_VERSION"
    mkdir -p "$WORK/deb"
    DSC="$WORK/deb/openmpi_${OMPI_DEB_VERSION}.dsc"
    if [[ ! -f "$DSC" ]]; then
        (cd "$WORK/deb" && apt-get source --download-only "openmpi=$OMPI_DEB_VERSION")
    fi
    [[ -f "$DSC" ]] || die "apt-get source did not produce $DSC"
    # dpkg-source verifies the checksums listed in the .dsc and applies
    # debian/patches (quilt series), exactly as a Debian build would.
    rm -rf "$SRC"
    dpkg-source -x "$DSC" "$SRC" >/dev/null
    (cd "$WORK/deb" && sha256sum ./*.orig.tar.* ./*.debian.tar.* > SHA256SUMS)
    # debian/rules regenerates configure after patching (libdir.patch edits
    # configure.ac, hppa.patch / fix-underlinking.patch edit Makefile.am).
    log "autogen (as debian/rules override_dh_update_autotools_config)"
    (cd "$SRC/config" && autom4te --language=m4sh opal_get_version.m4sh -o opal_get_version.sh)
    (cd "$SRC" && ./autogen.pl --force > "$WORK/autogen.log" 2>&1) \
        || { tail -40 "$WORK/autogen.log"; die "autogen.pl failed (log: $WORK/autogen.log)"; }
    echo "$OMPI_DEB_VERSION autogen" > "$STAMP"
    # A self-contained, already-generated source archive: carry this (plus
    # this script) to build where there is no apt and no autotools.
    log "packing prepared source $WORK/openmpi-src-autogen.tar.xz"
    tar -C "$WORK" --sort=name --mtime='2022-05-29 00:00Z' --owner=0 --group=0 \
        --numeric-owner --exclude=.pc -cf - openmpi-src | xz -T0 -6 > "$WORK/openmpi-src-autogen.tar.xz"
fi
T_SRC=$(date +%s)

# --- 4. configure --------------------------------------------------------------
# Reproducible: Open MPI's config/getdate.sh honours SOURCE_DATE_EPOCH (default:
# the Debian changelog date); configure records $HOSTNAME and $USER in ompi_info.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$SRC/debian/changelog" -STimestamp 2>/dev/null || echo 1653782400)}"
export SOURCE_DATE_EPOCH
OBJ="$WORK/obj"
rm -rf "$OBJ" && mkdir -p "$OBJ"
log "configure (prefix $PREFIX, cuda $CUDA_HOME)"
CONFIGURE_ARGS=(
    --prefix="$PREFIX"
    --with-cuda="$CUDA_HOME"            # CUDA-aware: smcuda BTL, coll/cuda, datatype
    --with-libevent=internal            # bundled: nothing outside the prefix
    --with-hwloc=internal
    --with-pmix=internal
    --disable-mpi-fortran
    --disable-mpi-java
    --disable-oshmem
    --disable-static
    --enable-shared
    --without-ucx                       # not needed on one node; keeps ob1+smcuda
    --without-verbs
    --without-ofi
    --without-psm
    --without-psm2
    --without-usnic
    --disable-mpi-cxx
    --disable-dependency-tracking
    --with-package-string="Debian OpenMPI $OMPI_DEB_VERSION + CUDA (hpcattn)"
    # Components that cannot help on one GPU node and pull in libraries:
    --enable-mca-no-build=btl-openib,btl-uct,btl-usnic,btl-portals4,mtl-ofi,mtl-psm,mtl-psm2,mtl-portals4,pml-ucx,osc-ucx,spml-ucx,plm-tm,ras-tm
)
(cd "$OBJ" && HOSTNAME=hpcattn-build USER=hpcattn \
    "$SRC/configure" "${CONFIGURE_ARGS[@]}" > "$WORK/configure.log" 2>&1) \
    || { tail -60 "$WORK/configure.log"; die "configure failed (log: $WORK/configure.log)"; }
grep -E "CUDA support|^Open MPI configuration" -A0 "$WORK/configure.log" || true
grep -qE "CUDA support[ .:]*yes" "$WORK/configure.log" || die "configure did not enable CUDA support"
T_CONF=$(date +%s)

# --- 5. build, install, strip, trim ----------------------------------------------
log "make -j$JOBS"
(cd "$OBJ" && HOSTNAME=hpcattn-build USER=hpcattn make -j"$JOBS" > "$WORK/make.log" 2>&1) \
    || { grep -nE "error|Error" "$WORK/make.log" | tail -30; die "make failed (log: $WORK/make.log)"; }
T_MAKE=$(date +%s)
log "make install -> $PREFIX"
rm -rf "$PREFIX"
(cd "$OBJ" && HOSTNAME=hpcattn-build USER=hpcattn make install > "$WORK/install.log" 2>&1) \
    || { tail -30 "$WORK/install.log"; die "make install failed"; }
log "strip + trim"
find "$PREFIX" -name '*.la' -delete
rm -rf "$PREFIX/share/man" "$PREFIX/share/doc"
# Strip every ELF file (executables and shared objects, incl. MCA components).
find "$PREFIX" -type f -print0 | while IFS= read -r -d '' f; do
    if [[ "$(head -c4 "$f" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
        strip --strip-unneeded "$f"
    fi
done

# --- 6. verify -------------------------------------------------------------------
log "verify"
export PATH="$PREFIX/bin:$PATH" LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OPAL_PREFIX="$PREFIX"
ompi_info --parsable --all | grep -E '(mpi|opal)_built_with_cuda_support:value:' | tee "$WORK/cuda-support.txt"
[[ "$(grep -c ':value:true' "$WORK/cuda-support.txt")" -ge 2 ]] || die "ompi_info: CUDA support is not built in"
SONAME="$(objdump -p "$PREFIX/lib/libmpi.so" | awk '/SONAME/ {print $2}')"
echo "libmpi SONAME: $SONAME"
[[ "$SONAME" == libmpi.so.40 ]] || die "unexpected SONAME $SONAME (want libmpi.so.40)"

# --- 7. pack ---------------------------------------------------------------------
log "pack $TARBALL"
rm -f "$TARBALL"
tar -C "$(dirname "$PREFIX")" --sort=name --mtime='2022-05-29 00:00Z' --owner=0 --group=0 \
    --numeric-owner -cf - "$(basename "$PREFIX")" | xz -T0 -"$XZ_LEVEL" > "$TARBALL"
T_END=$(date +%s)
SIZE=$(stat -c %s "$TARBALL")
(( SIZE < 48 * 1024 * 1024 )) || die "tarball is $SIZE bytes, too big to carry (64 MiB per call)"
log "done"
echo "prefix:   $PREFIX ($(du -sh "$PREFIX" | cut -f1) installed)"
echo "tarball:  $TARBALL ($SIZE bytes, $(numfmt --to=iec-i --suffix=B "$SIZE"))"
echo "sha256:   $(sha256sum "$TARBALL" | cut -d' ' -f1)"
echo "seconds:  source=$((T_SRC - T0)) configure=$((T_CONF - T_SRC)) make=$((T_MAKE - T_CONF)) install+strip+pack=$((T_END - T_MAKE)) total=$((T_END - T0)) (JOBS=$JOBS, $(nproc) cores)"
