//! systemd's side of `Type=notify`: a datagram socket at `NOTIFY_SOCKET` where the daemon says
//! READY=1, STOPPING=1, MAINPID= and stores descriptors (FDSTORE=1). It is read all the time,
//! as systemd reads it: a unix datagram queue holds few messages, and a daemon storing its
//! descriptors would block on a full one.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct NotifySocket {
    pub path: PathBuf,
    messages: Receiver<String>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    pub fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (tx, messages) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            path,
            messages,
            stop,
        }
    }

    /// The next message that carries `what` (e.g. `READY=1`); panics after 30 s without.
    pub fn wait_for(&self, what: &str) -> String {
        self.within(what, 30.0)
            .unwrap_or_else(|| panic!("no {what} from the daemon within 30 s"))
    }

    /// The next message that carries `what` within `secs`, if one came.
    pub fn within(&self, what: &str, secs: f64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let msg = self.messages.recv_timeout(left).ok()?;
            if msg.lines().any(|l| l == what) {
                return Some(msg);
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
