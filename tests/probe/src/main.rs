//! vsock-probe: a guest-side helper for the VMM's end-to-end tests, linked statically
//! and put into the test initrd. It moves a deterministic byte pattern over AF_VSOCK
//! so the host side can check every byte.
//!
//!   vsock-probe echo PORT BYTES      accept one connection, echo BYTES bytes back, then
//!                                    wait for the host's one-byte ack before exiting
//!                                    (so nothing is in flight when the test reboots)
//!   vsock-probe send CID PORT BYTES  connect, send BYTES of the pattern, half-close,
//!                                    print "vsock-probe: reply <n> bytes: <text>"

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zeroed is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(ret: libc::c_int, what: &str) -> std::io::Result<()> {
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

#[path = "../../src/pattern.rs"]
#[allow(dead_code)]
mod pattern;
use pattern::pattern;

fn echo(port: u32, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let s = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::bind(s.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) }, "bind")?;
    check(unsafe { libc::listen(s.as_raw_fd(), 4) }, "listen")?;
    println!("vsock-probe: listening on port {port}");
    // SAFETY: accept on a listening socket; result checked.
    let c = unsafe { libc::accept4(s.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    check(c, "accept")?;
    // A connected SOCK_STREAM fd works with UnixStream's read/write/shutdown.
    // SAFETY: c is a fresh connected socket we own.
    let mut conn = unsafe { UnixStream::from_raw_fd(c) };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while total < bytes {
        let want = (bytes - total).min(buf.len() as u64) as usize;
        let n = conn.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])?;
        total += n as u64;
    }
    let mut ack = [0u8; 1];
    let acked = conn.read(&mut ack)? == 1;
    println!("vsock-probe: echoed {total} bytes, ack {}", if acked { "received" } else { "missing" });
    Ok(())
}

fn send(cid: u32, port: u32, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let s = socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(s.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) }, "connect")?;
    // SAFETY: the fd is connected and ownership moves into the stream.
    let mut conn = unsafe { UnixStream::from_raw_fd(s.into_raw_fd()) };
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        pattern(&mut buf[..n], sent);
        conn.write_all(&buf[..n])?;
        sent += n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    println!("vsock-probe: reply {} bytes: {}", reply.len(), String::from_utf8_lossy(&reply).trim());
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let res = match (args.get(1).map(String::as_str), num(2), num(3), num(4)) {
        (Some("echo"), Some(port), Some(bytes), _) => echo(port as u32, bytes),
        (Some("send"), Some(cid), Some(port), Some(bytes)) => send(cid as u32, port as u32, bytes),
        _ => {
            eprintln!("usage: vsock-probe echo PORT BYTES | vsock-probe send CID PORT BYTES");
            std::process::exit(2);
        }
    };
    if let Err(e) = res {
        eprintln!("vsock-probe: {e}");
        std::process::exit(1);
    }
}
