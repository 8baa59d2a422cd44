#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/.

The seeds are valid (or deliberately borderline) inputs that get each target past its
first checks; libFuzzer mutates from there. The device targets' encoding (queues as
descriptor records, then the data blob) is `wisp_fuzz::load_ring` (fuzz/src/lib.rs).
Run it again after changing an encoding: `python3 fuzz/corpus/seeds.py`.
"""

import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

NEXT, WRITE = 1, 2


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- the guest driver encoding of fuzz/src/lib.rs ---------------------------------

def desc(offset, length, flags=0, nxt=0):
    """One descriptor pointing at `offset` in the data blob."""
    assert offset % 16 == 0 and offset // 16 < 0xFF00
    if length > 0xFFFF:
        assert length % 256 == 0
        flags |= 0x08
        length >>= 8
    return struct.pack("<HHBB", offset // 16, length, flags, nxt)


def queue(chains, bump=0):
    """Chains of (offset, length, flags) laid out in consecutive table slots, each head
    offered once."""
    descs, heads = [], []
    for chain in chains:
        heads.append(len(descs))
        for i, (off, length, flags) in enumerate(chain):
            last = i + 1 == len(chain)
            descs.append(desc(off, length, flags | (0 if last else NEXT), len(descs) + 1))
    assert len(descs) < 256 and len(heads) < 256
    return bytes([len(descs)]) + b"".join(descs) + bytes([len(heads)]) + bytes(heads) + bytes([bump])


def blob(pieces, size=None):
    """The data blob with `pieces` {offset: bytes} placed."""
    end = max(off + len(b) for off, b in pieces.items())
    out = bytearray(max(end, size or 0))
    for off, b in pieces.items():
        out[off:off + len(b)] = b
    return bytes(out)


def size_sel(n):
    return n.bit_length() - 1


# --- host-side parsers ---------------------------------------------------------------

def hybrid_vsock_connect():
    write("hybrid_vsock_connect", "ok", b"\x07CONNECT 1024\n")
    write("hybrid_vsock_connect", "payload", b"\x00CONNECT   52\r\npayload")
    write("hybrid_vsock_connect", "max", b"\x03CONNECT 4294967295\n")
    write("hybrid_vsock_connect", "padded", b"\x05CONNECT 0000000000000000000000001\n")
    write("hybrid_vsock_connect", "bad", b"\x01LISTEN 1024\n")


def hybrid_vsock_ok():
    p = lambda port: struct.pack("<I", port)
    write("hybrid_vsock_ok", "ok", p(1024) + b"OK 1073741824\npayload")
    write("hybrid_vsock_ok", "refused", p(1025))
    write("hybrid_vsock_ok", "no", p(52) + b"NO\n")
    write("hybrid_vsock_ok", "ok-space", p(7) + b"OK  5 \n")


def stdio_header():
    def hdr(stream, cid, eid, version=1):
        return (b"WSIO" + bytes([version, stream]) + struct.pack(">H", len(cid)) + cid
                + struct.pack(">H", len(eid)) + eid)
    write("stdio_header", "stdin", hdr(0, b"c1", b""))
    write("stdio_header", "tty", hdr(3, b"container-1", b"exec-9") + b"data after")
    write("stdio_header", "long", hdr(2, b"x" * 256, b"e"))
    write("stdio_header", "version", hdr(1, b"c", b"", version=2))


def mountinfo():
    info = (
        "36 1 0:32 / / rw - ext4 /dev/vda rw\n"
        "40 36 0:40 / /run/wisp/sb1/shared/c1/rootfs rw,nosuid - overlay overlay rw\n"
        "41 40 0:41 / /run/wisp/sb1/shared/c1/mounts/3 ro,nosuid,nodev - ext4 /dev/vda rw\n"
        "44 41 0:44 / /run/wisp/sb1/shared/c1/mounts/3/tmp\\040fs rw,nosuid,nodev - tmpfs none rw\n"
        "45 44 0:45 / /run/wisp/sb1/shared/c1/mounts/3/tmp\\040fs/deep ro - tmpfs none rw\n"
        "43 36 0:43 / /run/wisp/sb1/shared/with\\040space rw - tmpfs t rw\n"
        "not a mount line\n"
    )
    write("mountinfo", "table", info.encode())
    write("mountinfo", "cycle", b"1 2 0:1 / /a rw - t t rw\n2 1 0:2 / /a/b rw - t t rw\n3 3 0:3 / /a/b/c ro - t t rw\n")


def runtime_options():
    def enc(type_url, path):
        out = b""
        for tag, s in ((10, type_url.encode()), (18, path.encode())):
            out += bytes([tag, len(s)]) + s
        return out
    write("runtime_options", "path", b"\x00" + enc("", "/etc/wisp/other.toml"))
    write("runtime_options", "short-url", b"\x01" + enc("runtimeoptions.v1.Options", "/x.toml"))
    write("runtime_options", "runc", b"\x02\x08\x01")
    write("runtime_options", "garbage", b"\x01\x12\x32x")


def bundle_spec():
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "terminal": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pod-a",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/rro/", "type": "bind", "source": "/srv/a", "options": ["rbind", "rprivate", "rro"]},
        ],
        "annotations": {"io.kubernetes.cri.sandbox-id": "sb1", "io.kubernetes.cri.container-type": "container"},
    }
    write("bundle_spec", "pod", json.dumps(spec).encode())
    write("bundle_spec", "minimal", b'{"process":{}}')
    write("bundle_spec", "odd", b'{"process":{},"root":5,"mounts":[{"options":["bind"],"source":"/s","destination":"/d"},7]}')


# --- virtio devices ------------------------------------------------------------------

def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def virtio_blk():
    IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8
    chains = [
        [(0x000, 16, 0), (0x1000, 1024, WRITE), (0x3000, 1, WRITE)],       # read 2 sectors
        [(0x010, 16, 0), (0x1400, 512, 0), (0x3010, 1, WRITE)],            # write 1 sector
        [(0x020, 16, 0), (0x3020, 1, WRITE)],                              # flush
        [(0x030, 16, 0), (0x2000, 20, WRITE), (0x3030, 1, WRITE)],         # get id
        [(0x040, 16, 0), (0x1000, 512, WRITE), (0x3040, 1, WRITE)],        # read past the end
    ]
    data = blob({
        0x000: blk_header(IN, 1), 0x010: blk_header(OUT, 3), 0x020: blk_header(FLUSH, 0),
        0x030: blk_header(GET_ID, 0), 0x040: blk_header(IN, 63 + 1), 0x1400: b"\xab" * 512,
    })
    write("virtio_blk", "requests", bytes([0, size_sel(256)]) + queue(chains) + data)
    write("virtio_blk", "read-only", bytes([1, size_sel(16)]) + queue(chains[1:2]) + data)
    write("virtio_blk", "event-idx-lying", bytes([2, size_sel(8)]) + queue(chains[:1], bump=9) + data)


def virtio_mmio():
    ops = b""
    # op 6: negotiate, accept everything offered
    ops += bytes([6]) + struct.pack("<Q", (1 << 64) - 1)
    # op 7: queue 0, size 16, sane layout
    ops += bytes([7]) + struct.pack("<H", 16) + bytes([0])
    # op 9: the request header into guest memory at DATA_BASE (0x100000)
    ops += bytes([9]) + struct.pack("<I", 0x10_0000) + bytes([16]) + blk_header(0, 2)
    # op 8: queue contents for a 16-entry queue
    ops += bytes([8, size_sel(16)]) + queue([[(0x000, 16, 0), (0x1000, 512, WRITE), (0x3000, 1, WRITE)]])
    # op 5: add DRIVER_OK (1 << 2); the device starts and serves the queue on a kick
    ops += bytes([5, 2, 4])
    # read the config space (capacity), the interrupt status, then ack it
    ops += bytes([3]) + struct.pack("<H", 0x100) + bytes([3])
    ops += bytes([1, 0x60 // 4, 0, 0x64 // 4]) + struct.pack("<I", 1)
    # reset, then a broken setup: misaligned queue, DRIVER_OK -> NEEDS_RESET
    ops += bytes([0, 0x70 // 4]) + struct.pack("<I", 0)
    ops += bytes([6]) + struct.pack("<Q", (1 << 64) - 1)
    ops += bytes([7]) + struct.pack("<H", 16) + bytes([1]) + struct.pack("<QQQ", 8, 0x1000, 0x2000)
    ops += bytes([5, 2])
    write("virtio_mmio", "probe", ops)
    write("virtio_mmio", "registers", bytes([1, 0, 1, 1, 1, 2, 0, 0x14 // 4, 1, 0, 0, 0, 1, 0x10 // 4, 2, 0x70, 0, 4, 0xaa]))


def fuse(opcode, nodeid, body, unique):
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def fuse_seed(requests):
    """Each request in its own readable descriptor at 0x400 * i, with a 4 KiB reply buffer
    at 0x80000 + 0x1000 * i."""
    pieces, chains = {}, []
    for i, req in enumerate(requests):
        pieces[0x400 * i] = req
        chains.append([(0x400 * i, len(req), 0), (0x80000 + 0x1000 * i, 0x1000, WRITE)])
    return queue(chains), blob(pieces)


# File handles (fh) are 1: the passthrough numbers them from 1 for each new share.
def virtio_fs():
    LOOKUP, GETATTR, READLINK, MKDIR, OPEN, READ, WRITE_, INIT, OPENDIR, READDIR, CREATE = (
        1, 3, 5, 9, 14, 15, 16, 26, 27, 28, 35)
    init = fuse(INIT, 0, struct.pack("<IIII", 7, 31, 0x20000, 0), 1)
    read_file = [
        init,
        fuse(LOOKUP, 1, b"file\0", 2),
        fuse(GETATTR, 2, struct.pack("<IIQ", 0, 0, 0), 3),
        fuse(OPEN, 2, struct.pack("<II", os.O_RDONLY, 0), 4),
        fuse(READ, 2, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0), 5),
    ]
    create = [
        init,
        fuse(MKDIR, 1, struct.pack("<II", 0o755, 0o022) + b"newdir\0", 2),
        fuse(CREATE, 1, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0o022, 0) + b"new\0", 3),
        fuse(WRITE_, 3, struct.pack("<QQIIQII", 1, 0, 5, 0, 0, 0, 0) + b"hello", 4),
    ]
    walk = [
        init,
        fuse(LOOKUP, 1, b"escape\0", 2),
        fuse(READLINK, 2, b"", 3),
        fuse(LOOKUP, 1, b"..\0", 4),
        fuse(OPENDIR, 1, struct.pack("<II", 0, 0), 5),
        fuse(READDIR, 1, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0), 6),
    ]
    empty_hiprio = bytes([size_sel(16)]) + queue([])
    for name, reqs, flags in (("read", read_file, 0), ("create", create, 0), ("walk", walk, 2), ("ro-create", create, 1)):
        q, data = fuse_seed(reqs)
        write("virtio_fs", name, bytes([flags]) + empty_hiprio + bytes([size_sel(64)]) + q + data)


def vsock_pkt(op, src_port, dst_port, data=b"", buf_alloc=65536, fwd_cnt=0):
    # src_cid, dst_cid, src_port, dst_port, len, type (stream), op, flags, buf_alloc, fwd_cnt
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, len(data), 1, op, 0, buf_alloc, fwd_cnt) + data


def virtio_vsock():
    REQUEST, RST, SHUTDOWN, RW, CREDIT_REQUEST = 1, 3, 4, 5, 7
    pkts = [
        vsock_pkt(REQUEST, 5000, 1024),
        vsock_pkt(RW, 5000, 1024, b"hello host"),
        vsock_pkt(CREDIT_REQUEST, 5000, 1024),
        vsock_pkt(SHUTDOWN, 5000, 1024),
        vsock_pkt(RST, 5000, 1024),
        vsock_pkt(REQUEST, 5001, 4242),     # nobody listens there
    ]
    pieces = {0x100 * i: p for i, p in enumerate(pkts)}
    tx = queue([[(0x100 * i, len(p), 0)] for i, p in enumerate(pkts)])
    rx = queue([[(0x10000 + 0x2000 * i, 0x2000, WRITE)] for i in range(8)])
    data = blob(pieces)
    port = struct.pack("<I", 52)
    write("virtio_vsock", "guest-connects", bytes([0]) + port + bytes([size_sel(16)]) + rx + bytes([size_sel(16)]) + tx + data)
    write("virtio_vsock", "host-connects", bytes([1]) + port + bytes([size_sel(16)]) + rx + bytes([size_sel(16)]) + queue([]) + data)
    # a header split over two descriptors, and a short one
    split = queue([[(0x000, 20, 0), (0x020, 24, 0)], [(0x100, 10, 0)]])
    data2 = blob({0x000: pkts[0][:20], 0x020: pkts[0][20:], 0x100: pkts[1][:10]})
    write("virtio_vsock", "split", bytes([2]) + port + bytes([size_sel(16)]) + rx + bytes([size_sel(16)]) + split + data2)


def virtio_net():
    frame = bytes(12) + b"\xff" * 6 + b"\x02\x00\x00\x12\x34\x56" + b"\x08\x06" + bytes(46)
    features = struct.pack("<Q", (1 << 64) - 1)
    host = bytes([2]) + struct.pack("<H", len(frame)) + frame + struct.pack("<H", len(frame)) + frame
    rx = queue([[(0x10000 + 0x1000 * i, 0x1000, WRITE)] for i in range(4)])
    tx = queue([[(0x000, len(frame), 0)], [(0x100, 12, 0), (0x200, len(frame) - 12, 0)]])
    data = blob({0x000: frame, 0x100: frame[:12], 0x200: frame[12:]})
    write("virtio_net", "frames", features + struct.pack("<H", 0) + host + bytes([size_sel(16)]) + rx + bytes([size_sel(16)]) + tx + data)
    no_feat = struct.pack("<Q", 1 << 32)
    write("virtio_net", "plain-mtu", no_feat + struct.pack("<H", 1500) + bytes([0]) + bytes([size_sel(16)]) + rx + bytes([size_sel(16)]) + tx + data)


# --- agent_rpc: the first byte picks the request, then its protobuf encoding ---------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_bytes(field, data):
    """A length-delimited protobuf field (strings, bytes, messages)."""
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_varint(field, n):
    return varint(field << 3) + varint(n)


def agent_rpc():
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "/"},
        "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "env": ["PATH=/bin"]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "cgroupsPath": "/kubepods/pod1/c1",
            "rootfsPropagation": "rslave",
            "sysctl": {"net.ipv4.ip_forward": "1", "kernel.msgmax": "8192"},
        },
    }
    stdio = pb_varint(4, 1)  # StdioSpec.terminal = true
    create = pb_bytes(1, "c1") + pb_bytes(2, json.dumps(spec)) + pb_bytes(3, stdio) + pb_varint(4, 1)
    write("agent_rpc", "create-container", bytes([0]) + create)
    process = {"args": ["id"], "cwd": "/tmp", "user": {"uid": 1000, "gid": 1000}, "terminal": False}
    write("agent_rpc", "exec", bytes([1]) + pb_bytes(1, "c1") + pb_bytes(2, "e1") + pb_bytes(3, json.dumps(process)))
    resources = {"memory": {"limit": 268435456}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}}
    write("agent_rpc", "update", bytes([2]) + pb_bytes(1, "c1") + pb_bytes(2, json.dumps(resources)))
    address = pb_bytes(1, "10.88.0.5") + pb_varint(2, 16)
    iface = pb_bytes(1, "eth0") + pb_bytes(2, "02:42:0a:58:00:05") + pb_varint(3, 1500) + pb_bytes(4, address)
    write("agent_rpc", "interface", bytes([3]) + pb_bytes(1, iface))
    routes = pb_bytes(1, pb_bytes(1, "") + pb_bytes(2, "10.88.0.1") + pb_bytes(3, "eth0")) + pb_bytes(
        1, pb_bytes(1, "10.88.0.0/16") + pb_bytes(3, "eth0") + pb_bytes(4, "10.88.0.5") + pb_varint(6, 100))
    write("agent_rpc", "routes", bytes([4]) + routes)
    write("agent_rpc", "sandbox", bytes([5]) + pb_bytes(1, "sb1") + pb_bytes(2, "pod-host"))
    write("agent_rpc", "cgroups-path", bytes([6]) + b"kubepods/besteffort/pod1/c1")


# --- wisp-vmm snapshots (vmm/src/snapshot/format.rs, kvm_structs.rs) -------------------

def snap_str(s):
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def snap_section(kind, index, payload):
    body = struct.pack("<HHI", kind, index, len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def snap_cpuid(entries):
    return struct.pack("<H", len(entries)) + b"".join(struct.pack("<7I", *e) for e in entries)


def snap_header():
    cpuid = [(0, 0, 0, 0x1f, 0x756E6547, 0x6C65746E, 0x49656E69), (1, 0, 0, 0x806f8, 0x800, 0x80000000, 0),
             (7, 0, 1, 0, 0x20, 0, 0)]
    config = [("vcpus", "2"), ("memory_mib", "256"), ("kernel", "sha256:00ff")]
    return (snap_str("0.1.0") + snap_str("a9ab979c0d1e+src.0011223344556677") + snap_str("6.12.9-amd64")
            + snap_str("GenuineIntel") + struct.pack("<3I", 6, 0x8f, 8) + snap_cpuid(cpuid)
            + struct.pack("<H", len(config)) + b"".join(snap_str(k) + snap_str(v) for k, v in config))


def snap_vm():
    pic = bytes([0, 0, 0xfb, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xf8])
    ioapic = struct.pack("<QIIII", 0xfec00000, 0, 0, 0, 0) + struct.pack("<Q", 0x10000) * 24
    chips = b"".join(struct.pack("<I", i) + c.ljust(512, b"\0") for i, c in enumerate([pic, pic, ioapic]))
    channel = struct.pack("<IH10Bq", 0x10000, 0, 0, 0, 0, 0, 0, 0, 3, 2, 0, 1, 12345)
    return chips + channel * 3 + struct.pack("<I", 0) + struct.pack("<QIQQ", 123456789, 0, 0, 0)


def snap_segment(base, limit, selector, type_, s=1, l=0, db=1, g=1):
    return struct.pack("<QIH9B", base, limit, selector, type_, 1, 0, db, s, l, g, 0, 0)


def snap_vcpu(index):
    cpuid = [(0, 0, 0, 0x1f, 0, 0, 0), (1, 0, 0, 0x806f8, index << 24, 0x80000000, 0)]
    regs = struct.pack("<18Q", *([0] * 16 + [0x1000000 + index, 0x2]))
    segs = snap_segment(0, 0xfffff, 0x8, 0xb, l=1, db=0) + snap_segment(0, 0xfffff, 0x10, 0x3) * 5 \
        + snap_segment(0, 0xfffff, 0x18, 0xb, s=0) + snap_segment(0, 0xffff, 0, 2, s=0, g=0)
    tables = struct.pack("<QH", 0x500, 31) + struct.pack("<QH", 0x520, 7)
    crs = struct.pack("<7Q", 0x80000011, 0, 0x9000, 0x20, 0, 0x500, 0xfee00900 | (0x100 if index == 0 else 0))
    sregs = segs + tables + crs + struct.pack("<4Q", 0, 0, 0, 0)
    fpu = bytes(128) + struct.pack("<HHBHQQ", 0x37f, 0, 0, 0, 0, 0) + bytes(256) + struct.pack("<I", 0x1f80)
    xsave = struct.pack("<HH", 0x37f, 0) + bytes(20) + struct.pack("<I", 0x1f80) + bytes(4096 - 28)
    xcrs = struct.pack("<II", 1, 0) + struct.pack("<IQ", 0, 3) + struct.pack("<IQ", 0, 0) * 15
    msrs = [(0x10, 1000), (0x1b, 0xfee00900), (0x174, 0), (0x1a0, 1), (0x277, 0x0007040600070406), (0xc0000080, 0x500),
            (0xc0000082, 0xffffffff81000000)]
    msr = struct.pack("<H", len(msrs)) + b"".join(struct.pack("<IQ", i, d) for i, d in msrs)
    lapic = bytearray(1024)
    lapic[0x20:0x24] = struct.pack("<I", index << 24)
    lapic[0xf0:0xf4] = struct.pack("<I", 0x1ff)
    lapic[0x350:0x354] = struct.pack("<I", 0x700)
    lapic[0x360:0x364] = struct.pack("<I", 0x400)
    debug = struct.pack("<7Q", 0, 0, 0, 0, 0xffff0ff0, 0x400, 0)
    events = struct.pack("<4BI", 0, 0, 0, 0, 0) + bytes(4) + bytes(3) + struct.pack("<II", 0, 0) + bytes(4) + bytes(1) \
        + bytes(1) + struct.pack("<Q", 0)
    return (snap_cpuid(cpuid) + struct.pack("<I", 2_000_000) + struct.pack("<I", 0 if index == 0 else 1) + regs + sregs
            + fpu + xsave + xcrs + msr + bytes(lapic) + debug + events)


def snapshot_file(sections, version=3):
    return b"WISPSNAP" + struct.pack("<I", version) + b"".join(sections)


def snapshot():
    header = snap_section(1, 0, snap_header())
    vm = snap_section(2, 0, snap_vm())
    vcpus = [snap_section(3, i, snap_vcpu(i)) for i in range(2)]
    # A running vsock transport (three queues) and an rng its driver never started.
    vsock_queues = [(256, 1, 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000, 0x10000 * (i + 1) + 0x2000, 5, 4)
                    for i in range(3)]
    devices = [snap_section(5, 0, transport_state(0xF, (1 << 32) | (1 << 29), vsock_queues, device_type=19)),
               snap_section(5, 1, transport_state(0, 0, [(256, 0, 0, 0, 0, 0, 0)]))]
    end = snap_section(4, 0, struct.pack("<HH", 2, 2))
    # The memory file's id and its two regions (below the MMIO gap, and above 4 GiB).
    memory = snap_section(6, 0, b"0123456789abcdef" + struct.pack("<HQQQQ", 2, 0, 0xC000_0000, 1 << 32, 0x4000_0000))
    # A serial console: present, nine registers, a receive FIFO of 5 bytes.
    legacy = snap_section(7, 0, bytes([1, 1, 0, 2, 0xC2, 3, 0x60, 8, 0xB0, 0x5A]) + struct.pack("<H", 5) + b"typed")
    no_serial = snap_section(7, 0, bytes([0]))
    valid = snapshot_file([header, vm, memory] + vcpus + devices + [legacy, end])
    write("snapshot", "valid", valid)
    write("snapshot", "valid-1vcpu",
          snapshot_file([header, vm, memory, vcpus[0], no_serial, snap_section(4, 0, struct.pack("<HH", 1, 0))]))
    flipped = bytearray(valid)
    flipped[12 + len(header) + len(vm) + len(memory) + 300] ^= 0x10
    write("snapshot", "bad-checksum", bytes(flipped))
    write("snapshot", "bad-truncated", valid[:len(valid) - 100])
    write("snapshot", "bad-order", snapshot_file([vm, header, memory] + vcpus + devices + [legacy, end]))
    write("snapshot", "bad-duplicate", snapshot_file([header, vm, memory, vcpus[0], vcpus[0]] + devices + [legacy, end]))
    write("snapshot", "bad-device-order",
          snapshot_file([header, vm, memory, vcpus[0], devices[0], vcpus[1], devices[1], legacy, end]))
    write("snapshot", "bad-no-legacy", snapshot_file([header, vm, memory] + vcpus + devices + [end]))
    write("snapshot", "bad-version", snapshot_file([header, vm, memory] + vcpus + devices + [legacy, end], version=2))
    huge = bytearray(valid)
    huge[16:20] = struct.pack("<I", 0xffffffff)
    write("snapshot", "bad-length", bytes(huge))


def memory_trailer():
    """`wisp_vmm::snapshot::memory`'s trailer page: magic, version, id, regions, crc32,
    zero padding to 4096 bytes."""
    def page(regions, magic=b"WISPMEM\0", version=1):
        body = magic + struct.pack("<I", version) + b"0123456789abcdef" + struct.pack("<H", len(regions))
        body += b"".join(struct.pack("<QQ", a, n) for a, n in regions)
        body += struct.pack("<I", zlib.crc32(body))
        return body + bytes(4096 - len(body))
    two = [(0, 0xC000_0000), (1 << 32, 0x4000_0000)]
    write("memory_trailer", "valid", page(two))
    write("memory_trailer", "valid-small", page([(0, 128 << 20)]))
    write("memory_trailer", "bad-overlap", page([(0, 8192), (4096, 4096)]))
    write("memory_trailer", "bad-magic", page(two, magic=b"WISPSNAP"))
    write("memory_trailer", "bad-version", page(two, version=2))
    bad = bytearray(page(two))
    bad[40] ^= 1
    write("memory_trailer", "bad-checksum", bytes(bad))


def transport_state(status, features, queues, interrupt=0, refused=0, device_type=4):
    """`wisp_vmm::snapshot::TransportState`'s encoding: queues are (size, ready, desc,
    avail, used, next_avail, next_used)."""
    out = struct.pack("<IIIIQIIIB", device_type, status, 1, 1, features, 0, 0, interrupt, refused)
    out += struct.pack("<H", len(queues))
    for size, ready, d, a, u, na, nu in queues:
        out += struct.pack("<IBQQQHH", size, ready, d, a, u, na, nu)
    return out


def mmio_restore():
    # virtio-rng's one queue of 256 where `wisp_fuzz::ring(&mem, 0, 256)` lays it out.
    size, d = 256, 0
    a = d + 16 * size
    u = (a + 6 + 2 * size + 3) & ~3
    version_1 = 1 << 32
    requests = queue([[(0, 64, WRITE)], [(0x100, 16, WRITE)], [(0x200, 8, WRITE)]])
    data = blob({0x300: b"\0"})
    running = transport_state(0xF, version_1, [(size, 1, d, a, u, 2, 2)], interrupt=1)
    write("mmio_restore", "running", running + requests + data)
    write("mmio_restore", "running-wrapped", transport_state(0xF, version_1, [(size, 1, d, a, u, 65535, 65534)]) + requests + data)
    write("mmio_restore", "features-ok", transport_state(0xB, version_1, [(size, 1, d, a, u, 0, 0)]) + requests + data)
    write("mmio_restore", "needs-reset", transport_state(0x4F, version_1, [(size, 1, d, a, u, 0, 0)]) + requests + data)
    write("mmio_restore", "outside", transport_state(0xF, version_1, [(size, 1, d, a, 4 << 20, 0, 0)]) + requests + data)
    write("mmio_restore", "other-device", transport_state(0xF, version_1, [(size, 1, d, a, u, 0, 0)], device_type=19))


if __name__ == "__main__":
    for f in (hybrid_vsock_connect, hybrid_vsock_ok, stdio_header, mountinfo, runtime_options, bundle_spec,
              virtio_blk, virtio_mmio, virtio_fs, virtio_vsock, virtio_net, agent_rpc, snapshot, mmio_restore, memory_trailer):
        f()
