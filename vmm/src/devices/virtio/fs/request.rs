//! One FUSE request from a virtqueue to the server and back.
//!
//! The chain's device-readable part is the request (`InHeader` + arguments), the
//! device-writable part takes the reply (`OutHeader` + data). fuse-backend-rs parses
//! and answers the request; this file covers what it leaves to the transport: a chain
//! that cannot be read, a header too short to hold an `InHeader`, an opcode the
//! library does not know (ENOSYS here: the library would transmute it into its `Opcode`
//! enum when tracing is on), a request the library rejects without writing a reply, and a panic inside
//! the library. Each of those gets a FUSE error reply when the chain has room for one,
//! so the guest's request completes with an error instead of hanging.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

/// Size of the reply header; an error reply is exactly this.
pub const OUT_HEADER_SIZE: u32 = std::mem::size_of::<OutHeader>() as u32;

/// Why a request was answered by the transport rather than by the server.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("request {head}: the descriptor chain cannot be mapped: {reason}")]
    Chain { head: u16, reason: String },
    #[error("request {head}: {got} readable bytes, too short for a FUSE header")]
    ShortHeader { head: u16, got: usize },
    #[error("request {head}: unknown FUSE opcode {opcode}")]
    UnknownOpcode { head: u16, opcode: u32 },
    #[error("request {head} (opcode {opcode}): {reason}")]
    Rejected { head: u16, opcode: u32, reason: String },
    #[error("request {head} (opcode {opcode}): the FUSE server panicked")]
    Panicked { head: u16, opcode: u32 },
}

/// How a request ended: the used length to return, and the problem if the transport had
/// to answer it.
pub struct Served {
    pub used_len: u32,
    pub problem: Option<BadRequest>,
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// The opcodes fuse-backend-rs 0.14 has an `Opcode` variant for. Others (7, 19, 50 and
/// up: gaps, CUSE, byte-swapped INIT) are answered with ENOSYS here.
fn is_known_opcode(opcode: u32) -> bool {
    matches!(opcode, 1..=6 | 8..=18 | 20..=49)
}

/// Serves one request and writes its reply into the chain.
pub fn serve<F: FileSystem + Sync>(server: &Server<F>, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Served {
    let head = chain.head_index();
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => return answer(mem, chain, 0, libc::EINVAL, BadRequest::Chain { head, reason: e.to_string() }),
    };
    let got = reader.available_bytes();
    let header: InHeader = match reader.clone().read_obj() {
        Ok(h) => h,
        Err(_) => return answer(mem, chain, 0, libc::EINVAL, BadRequest::ShortHeader { head, got }),
    };
    let (opcode, unique) = (header.opcode, header.unique);
    if !is_known_opcode(opcode) {
        // ENOSYS is how FUSE says "not implemented", and drivers probe with newer
        // opcodes (Linux sends SYNCFS, 50, on sync): not a guest error worth a warning.
        log::debug!("virtio-fs: {}, answered ENOSYS", BadRequest::UnknownOpcode { head, opcode });
        return Served { used_len: reply_header(mem, chain, unique, libc::ENOSYS).unwrap_or(0), problem: None };
    }
    let writer: Writer<'_> = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => w.into(),
        Err(e) => return Served { used_len: 0, problem: Some(BadRequest::Chain { head, reason: e.to_string() }) },
    };
    match catch_unwind(AssertUnwindSafe(|| server.handle_message(reader, writer, None, None))) {
        // The reply is at most one FUSE buffer (about 1 MiB): it fits.
        // DESTROY is answered with a bare header, but the library reports 0 bytes written:
        // write that header here so the used length matches it.
        Ok(Ok(0)) if opcode == Opcode::Destroy as u32 => {
            Served { used_len: reply_header(mem, chain, unique, 0).unwrap_or(0), problem: None }
        }
        Ok(Ok(written)) => Served { used_len: u32::try_from(written).unwrap_or(u32::MAX), problem: None },
        Ok(Err(e)) if is_forget(opcode) => {
            // FORGET and BATCH_FORGET have no reply, even when they are malformed.
            Served { used_len: 0, problem: Some(BadRequest::Rejected { head, opcode, reason: e.to_string() }) }
        }
        Ok(Err(e)) => {
            answer(mem, chain, unique, libc::EINVAL, BadRequest::Rejected { head, opcode, reason: e.to_string() })
        }
        Err(_) => answer(mem, chain, unique, libc::EIO, BadRequest::Panicked { head, opcode }),
    }
}

fn is_forget(opcode: u32) -> bool {
    opcode == Opcode::Forget as u32 || opcode == Opcode::BatchForget as u32
}

/// Writes a FUSE error reply (`-errno`) at the start of the chain's writable part,
/// replacing anything the server may have written, and reports `problem`.
fn answer(mem: &GuestMemoryMmap, chain: Chain<'_>, unique: u64, errno: i32, problem: BadRequest) -> Served {
    let used_len = reply_header(mem, chain, unique, errno).unwrap_or(0);
    Served { used_len, problem: Some(problem) }
}

/// Writes a bare reply header (`error` = `-errno`, 0 for success) at the start of the
/// chain's writable part. Returns its length, or an error when there is no room for it.
fn reply_header(mem: &GuestMemoryMmap, chain: Chain<'_>, unique: u64, errno: i32) -> io::Result<u32> {
    let mut writer = VirtioFsWriter::new(mem, chain).map_err(|e| io::Error::other(e.to_string()))?;
    let header = OutHeader { len: OUT_HEADER_SIZE, error: -errno, unique };
    writer.write_obj(header)?;
    Ok(OUT_HEADER_SIZE)
}
