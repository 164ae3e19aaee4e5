//! Helpers for the kill -9 tests (`mod killing;`): freezing a child process at
//! an observed moment, killing it there, and comparing run folders.
//!
//! The kill lands exactly where the test looked: the child is stopped with
//! SIGSTOP, the test waits until every one of its threads is stopped, looks at
//! the run folder again (nothing can change while it is stopped), and only then
//! sends SIGKILL, or SIGCONT if the moment has passed.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

extern "C" {
    // libc's kill(2); std links libc on every Unix target.
    fn kill(pid: i32, sig: i32) -> i32;
}

const SIGKILL: i32 = 9;
#[cfg(any(target_os = "linux", target_os = "android"))]
const SIGSTOP: i32 = 19;
#[cfg(any(target_os = "linux", target_os = "android"))]
const SIGCONT: i32 = 18;

fn signal(child: &Child, sig: i32) {
    let rc = unsafe { kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig}) failed: {}", child.id(), std::io::Error::last_os_error());
}

/// The scheduler state of each thread of `pid` (`R`, `S`, `D`, `T`, `Z`...).
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        // "tid (comm) S ...": the state follows the last ')', the name may hold anything.
        .filter_map(|s| s.rfind(')').and_then(|i| s[i + 1..].trim_start().chars().next()))
        .collect()
}

/// Stops `child` (SIGSTOP) and waits until all of its threads are stopped:
/// from then on its files stay as they are. Returns false if it had already
/// exited (or exits meanwhile).
pub fn freeze(child: &mut Child) -> bool {
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    signal(child, SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = thread_states(child.id());
        if states.is_empty() || states.contains(&'Z') || states.contains(&'X') {
            return false; // exited before the signal landed
        }
        if states.iter().all(|&s| s == 'T' || s == 't') {
            return true;
        }
        // A thread in the middle of a system call (an fsync, say) stops when it returns.
        assert!(Instant::now() < deadline, "pid {} did not stop in 30 s: {states:?}", child.id());
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Lets a frozen child go on.
pub fn thaw(child: &Child) {
    signal(child, SIGCONT);
}

/// SIGKILL (works on a stopped process too) and reaps it.
pub fn kill9(child: &mut Child) {
    signal(child, SIGKILL);
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(SIGKILL), "the child was not killed by SIGKILL: {status:?}");
}

/// Every file under `dir` by relative path ('/'-separated), with its bytes;
/// the runner's lock file `.orchestrate.lock` is left out.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if e.file_name() != ".orchestrate.lock" {
                let rel: Vec<String> = p
                    .strip_prefix(root)
                    .unwrap()
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.insert(rel.join("/"), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Every path under `dir` (folders included) whose name marks it as temporary
/// or half-written: `*.partial`, `.*.partial-*`, `*.tmp`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".partial") || name.ends_with(".tmp") {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Compares two file maps: the same paths, and the same bytes for each path
/// `same` is not given for; where it is, `same(path, a, b)` decides (and
/// should assert with a message of its own).
pub fn assert_same_files(
    what: &str,
    a: &BTreeMap<String, Vec<u8>>,
    b: &BTreeMap<String, Vec<u8>>,
    mut same: impl FnMut(&str, &[u8], &[u8]) -> Option<bool>,
) {
    let (ka, kb): (Vec<&String>, Vec<&String>) = (a.keys().collect(), b.keys().collect());
    assert_eq!(ka, kb, "{what}: the folders hold other files");
    let differ: Vec<&String> = a
        .iter()
        .filter(|(k, v)| !same(k, v, &b[*k]).unwrap_or_else(|| **v == b[*k]))
        .map(|(k, _)| k)
        .collect();
    assert!(differ.is_empty(), "{what}: these files differ: {differ:?}");
}
