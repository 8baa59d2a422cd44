//! The host side of the hybrid-vsock handshake (`wisp_protocols::hybrid_vsock::connect`),
//! run against a fake VMM on a real Unix socket: the fake reads the `CONNECT <port>` line
//! and answers with the fuzzer's bytes, then closes. Properties: no panic or hang; the
//! line sent is `CONNECT <port>\n`; a connection only for an `OK <u32>` line; a refusal
//! only for an empty answer; the guest's bytes after the newline all reach the caller.
#![no_main]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wisp_protocols::hybrid_vsock::{connect, DialError};

struct FakeVmm {
    path: PathBuf,
    answers: Mutex<Sender<Vec<u8>>>,
    lines: Mutex<Receiver<String>>,
    _dir: tempfile::TempDir,
}

fn fake_vmm() -> &'static FakeVmm {
    static FAKE: OnceLock<FakeVmm> = OnceLock::new();
    FAKE.get_or_init(|| {
        wisp_fuzz::init_process();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (answer_tx, answer_rx) = channel::<Vec<u8>>();
        let (line_tx, line_rx) = channel::<String>();
        std::thread::spawn(move || {
            for answer in answer_rx {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let _ = s.write_all(&answer);
                drop(s);
                line_tx.send(line).unwrap();
            }
        });
        FakeVmm { path, answers: Mutex::new(answer_tx), lines: Mutex::new(line_rx), _dir: dir }
    })
}

/// What the answer must give, written independently of `connect`: Some(true) a
/// connection, Some(false) a refusal, None another error.
fn expected(answer: &[u8]) -> Option<bool> {
    if answer.is_empty() {
        return Some(false);
    }
    let nl = answer.iter().take(65).position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&answer[..nl]);
    line.strip_prefix("OK ").and_then(|n| n.trim().parse::<u32>().ok()).map(|_| true)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 || data.len() > 1024 {
        return;
    }
    let port = u32::from_le_bytes(data[..4].try_into().unwrap());
    let answer = &data[4..];
    let fake = fake_vmm();
    fake.answers.lock().unwrap().send(answer.to_vec()).unwrap();
    let result = connect(&fake.path, port, Duration::from_secs(10));
    let line = fake.lines.lock().unwrap().recv().unwrap();
    assert_eq!(line, format!("CONNECT {port}\n"));
    match (result, expected(answer)) {
        (Ok(mut stream), Some(true)) => {
            let nl = answer.iter().position(|&b| b == b'\n').unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, &answer[nl + 1..], "the guest's first bytes were eaten");
        }
        (Err(DialError::Refused { .. }), Some(false)) => {}
        (Err(DialError::Unexpected { .. }), None) => {}
        (r, want) => panic!("answer {answer:?}: got {:?}, want {want:?}", r.map(|_| ())),
    }
});
