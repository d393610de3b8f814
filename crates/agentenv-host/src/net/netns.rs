//! [`NetnsThread`]: one OS thread that has joined a network namespace and runs
//! jobs there.
//!
//! The network namespace is a per-thread attribute: a thread that calls
//! `setns(CLONE_NEWNET)` moves alone, and what it then creates — netlink
//! sockets, `/dev/net/tun` devices, child processes such as `nft`, sysctl
//! writes under `/proc/sys/net` — belongs to the namespace it is in. So all of
//! agentenv's network work for one namespace runs on one dedicated thread
//! that joined it once; the tokio runtime's threads never change namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use agentenv_core::net::NetError;

type Job = Box<dyn FnOnce() + Send>;

/// A worker thread in a network namespace.
#[derive(Debug)]
pub struct NetnsThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    netns: Option<PathBuf>,
}

impl NetnsThread {
    /// Starts the thread and moves it into the namespace at `netns` (a path
    /// like `/run/netns/NAME` or `/proc/PID/ns/net`); `None` stays in the
    /// current one.
    pub fn spawn(netns: Option<&Path>) -> Result<NetnsThread, NetError> {
        let file = match netns {
            Some(path) => Some(File::open(path).map_err(|e| NetError {
                context: format!("open network namespace {}", path.display()),
                message: e.to_string(),
            })?),
            None => None,
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("agentenv-net".into())
            .spawn(move || {
                if let Some(file) = file {
                    // SAFETY: `file` is an open namespace file for the whole
                    // call; setns only changes this thread's namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        let _ = ready_tx.send(Err(std::io::Error::last_os_error()));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    // A panicking job drops its reply sender, so its caller sees
                    // an error; the thread stays for the next job.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| NetError {
                context: "start the network worker thread".into(),
                message: e.to_string(),
            })?;
        let joined = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended before joining")));
        if let Err(e) = joined {
            let _ = thread.join();
            return Err(NetError {
                context: format!(
                    "join network namespace {}",
                    netns.map(|p| p.display().to_string()).unwrap_or_default()
                ),
                message: e.to_string(),
            });
        }
        Ok(NetnsThread {
            jobs: Some(jobs),
            thread: Some(thread),
            netns: netns.map(Path::to_path_buf),
        })
    }

    /// The namespace path the thread joined (`None`: the daemon's own).
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Runs `f` on the thread and waits for it, blocking the caller. Meant for
    /// startup and for threads outside an async runtime.
    pub fn run_blocking<R, F>(&self, f: F) -> Result<R, NetError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| panicked())
    }

    /// Runs `f` on the thread; the future completes with its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| panicked())
    }

    fn submit(&self, job: Job) -> Result<(), NetError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| NetError {
                context: "network worker".into(),
                message: "the worker thread has stopped".into(),
            })
    }
}

fn panicked() -> NetError {
    NetError {
        context: "network worker".into(),
        message: "the job panicked".into(),
    }
}

impl Drop for NetnsThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the job it is running.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_in_order_on_one_thread() {
        let t = NetnsThread::spawn(None).unwrap();
        let a = t.run_blocking(|| std::thread::current().id()).unwrap();
        let b = t.run_blocking(|| std::thread::current().id()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, std::thread::current().id());
    }

    #[test]
    fn a_panicking_job_is_an_error_and_the_thread_survives() {
        let t = NetnsThread::spawn(None).unwrap();
        let e = t.run_blocking(|| -> u32 { panic!("boom") }).unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_eq!(t.run_blocking(|| 7).unwrap(), 7);
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let e = NetnsThread::spawn(Some(Path::new("/run/netns/agentenv-no-such-ns"))).unwrap_err();
        assert!(
            e.to_string().contains("/run/netns/agentenv-no-such-ns"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn async_jobs_complete() {
        let t = NetnsThread::spawn(None).unwrap();
        assert_eq!(t.run(|| 2 + 2).await.unwrap(), 4);
    }
}
