//! The guest end of the serial lifeline (see `envd_proto::lifeline`).
//!
//! One blocking thread owns the port: it reads a JSON line, answers it, repeats. The port can be
//! opened only once, so it is opened once and kept; when no host is connected a read returns end
//! of file at once, so the thread then naps instead of spinning.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use envd_proto::lifeline::{LifelineOp, LifelineReply, LifelineRequest, MAX_LINE, PORT_NAME};

use crate::netguard::{self, NetConfig};

/// How long to nap when no host is connected (bounds the delay before a new host is served).
const IDLE_NAP: Duration = Duration::from_millis(200);

pub fn spawn(net: Option<NetConfig>) {
    let spawned = std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(move || serve(net));
    if let Err(e) = spawned {
        eprintln!("envd: cannot start the lifeline: {e}");
    }
}

fn serve(net: Option<NetConfig>) {
    // The device appears when virtio_console has probed it, normally before envd starts; a VM
    // without the port (an older VMM configuration) simply has no lifeline.
    let mut port = None;
    for _ in 0..50 {
        if let Some(f) = find_port().and_then(|dev| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dev)
                .ok()
        }) {
            port = Some(f);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(port) = port else {
        eprintln!("envd: no virtio-serial port named {PORT_NAME}: no lifeline");
        return;
    };
    let mut writer = match port.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("envd: lifeline: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(port);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => {
                std::thread::sleep(IDLE_NAP);
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("envd: lifeline read: {e}");
                std::thread::sleep(IDLE_NAP);
                continue;
            }
        }
        if line.last() != Some(&b'\n') {
            // Over-long or cut by a host that went away: drop the rest of this line.
            let mut rest = Vec::new();
            let _ = (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut rest);
            continue;
        }
        let reply = answer(&line, net.as_ref());
        if let Ok(mut bytes) = serde_json::to_vec(&reply) {
            bytes.push(b'\n');
            // A host that left before the answer: nothing to do, the next one asks again.
            let _ = writer.write_all(&bytes);
        }
    }
}

/// The device node of the port named [`PORT_NAME`], e.g. `/dev/vport3p1`.
fn find_port() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME)
        })
        .map(|e| std::path::Path::new("/dev").join(e.file_name()))
}

fn answer(line: &[u8], net: Option<&NetConfig>) -> LifelineReply {
    let mut reply = LifelineReply {
        envd_version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    match serde_json::from_slice::<LifelineRequest>(line) {
        Ok(req) => {
            reply.id = req.id;
            match req.op {
                LifelineOp::Health | LifelineOp::RepairNetwork => {
                    reply.network = net.map(netguard::repair);
                }
            }
        }
        Err(e) => reply.error = Some(format!("bad request: {e}")),
    }
    reply
}
