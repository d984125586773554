//! Background mounts: `bucketfs mount` returns once the mount answers, and a detached daemon
//! serves it, as `mount-s3`, `gcsfuse` and `s3fs` do.
//!
//! ## Why a re-exec, not a fork
//! Forking a process that runs threads (the tokio runtime, the SDKs' connection pools) copies
//! one thread and every lock as it was, possibly held: the child can deadlock at its first
//! allocation. So the command that was asked for a background mount starts nothing itself: it
//! runs its own executable again, in the foreground and in a new session (no controlling
//! terminal: closing the terminal does not stop the mount), with stdin on `/dev/null`, stderr
//! on the log file, and stdout on a pipe back to the waiting command.
//!
//! ## The readiness pipe
//! The daemon writes one line on that pipe: `ready` once a `stat` of the mount's root is
//! answered by the mount, or `error <exit code> <message>` when it cannot mount (the message
//! also goes to the log). The waiting command then exits 0, or with that code and message. If
//! the pipe closes without a line (the daemon died), the waiting command reports the daemon's
//! exit status and the log file. A daemon that failed has mounted nothing, or has unmounted
//! what it mounted, before it writes its error.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Set in the daemon's environment: its stdout is the readiness pipe.
const READY_ENV: &str = "BUCKETFS_DAEMON_READY_PIPE";

/// The write end of the readiness pipe, in the daemon; taken by the first report.
static READY_PIPE: Mutex<Option<File>> = Mutex::new(None);

/// Starts the daemon for `argv` (this process's arguments, without the program name) with its
/// log appended to `log_file`, and waits until it reports. `Err((exit code, message))` when it
/// could not mount.
pub fn spawn(argv: &[OsString], log_file: &Path) -> Result<(), (u8, String)> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            (
                2,
                format!("cannot create the log directory {}: {e}", dir.display()),
            )
        })?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| {
            (
                2,
                format!("cannot open the log file {}: {e}", log_file.display()),
            )
        })?;
    // The executable's own path, so the daemon is `bucketfs` in ps and pgrep; the kernel's link
    // to it if that path is gone (replaced by a rebuild).
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let mut cmd = Command::new(exe);
    cmd.arg0("bucketfs")
        .args(argv)
        .env("BUCKETFS_FOREGROUND", "true")
        .env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe, as a pre_exec closure must be.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| (1, format!("cannot start the mount daemon: {e}")))?;
    let mut line = String::new();
    let pipe = child.stdout.take().expect("stdout is piped");
    let _ = BufReader::new(pipe).read_line(&mut line);
    let line = line.trim_end();
    if line == "ready" {
        return Ok(());
    }
    if let Some(rest) = line.strip_prefix("error ")
        && let Some((code, message)) = rest.split_once(' ')
        && let Ok(code) = code.parse::<u8>()
    {
        let _ = child.wait();
        return Err((code, message.to_string()));
    }
    let status = child.wait();
    let how = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => e.to_string(),
    };
    Err((
        1,
        format!(
            "the mount daemon {how} before the mount was ready; see {}",
            log_file.display()
        ),
    ))
}

/// In the daemon: takes the readiness pipe over from stdout (which then goes to the log, like
/// stderr). Call before anything else runs; a no-op outside a daemon.
pub fn adopt_ready_pipe() {
    if std::env::var_os(READY_ENV).is_none() {
        return;
    }
    // Our own stdout kept as the pipe, then stderr over it; no other thread runs yet.
    let Ok(pipe) = nix::unistd::dup(std::io::stdout()) else {
        return;
    };
    let _ = nix::unistd::dup2_stdout(std::io::stderr());
    *READY_PIPE.lock().unwrap() = Some(File::from(pipe));
}

/// In a daemon, moves to `/`, so that the directory it was started from is not kept busy (it
/// could not be unmounted). Every path the daemon uses is absolute by then. A no-op outside a
/// daemon.
pub fn leave_working_directory() {
    if READY_PIPE.lock().unwrap().is_some() {
        let _ = std::env::set_current_dir("/");
    }
}

/// Tells the waiting command that the mount answers.
pub fn report_ready() {
    report("ready");
}

/// Tells the waiting command why the mount failed, with the exit code it ends with.
pub fn report_failure(code: u8, message: &str) {
    let one_line = message.replace('\n', " ");
    report(&format!("error {code} {one_line}"));
}

fn report(line: &str) {
    if let Some(mut pipe) = READY_PIPE.lock().unwrap().take() {
        let _ = writeln!(pipe, "{line}");
    }
}

/// Where a background mount of `mountpoint` logs without `--log-file`: `logs/MOUNT.log` under
/// the cache directory if one is given (it is the directory bucketfs already owns), else under
/// the XDG state directory (`$XDG_STATE_HOME`, or `~/.local/state`), else under the temp dir.
pub fn default_log_file(cache_dir: Option<&Path>, mountpoint: &Path) -> PathBuf {
    let dir = match cache_dir {
        Some(c) => c.join("logs"),
        None => match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            Some(state) => PathBuf::from(state).join("bucketfs"),
            None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                Some(home) => PathBuf::from(home).join(".local/state/bucketfs"),
                None => crate::config::local_dir(None).join("logs"),
            },
        },
    };
    let absolute = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.into());
    let name = absolute
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    let name = if name.is_empty() { "root".into() } else { name };
    dir.join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_files_are_named_after_the_mount_point() {
        let f = default_log_file(Some(Path::new("/var/cache/b")), Path::new("/nonexistent/m"));
        assert_eq!(f, Path::new("/var/cache/b/logs/nonexistent-m.log"));
    }
}
