//! Who owns what mailtriage writes, and permission errors worded for an admin.
//!
//! The service runs as its own user (`mailtriage` in the package) and owns
//! its state directory. An admin runs `check-config`, `retrain`, `train
//! --out`… as root: every file or directory such a command creates takes the
//! owner of the directory it is created in ([`inherit_owner`],
//! [`create_dir_all`]), so the service can still write it. A file error is
//! reported through [`describe`]: "permission denied", the path, its owner
//! and the `chown` that fixes it, never a bare `os error 13`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A user account, as the password database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The account named `name`, if the system has one.
pub fn user_by_name(name: &str) -> io::Result<Option<Account>> {
    let Ok(c) = CString::new(name) else { return Ok(None) };
    lookup(|pwd, buf, len, out| {
        // SAFETY: all pointers are valid for the call; `buf` holds `len` bytes.
        unsafe { libc::getpwnam_r(c.as_ptr(), pwd, buf, len, out) }
    })
}

/// The account of `uid`, if the system has one.
pub fn user_by_uid(uid: u32) -> io::Result<Option<Account>> {
    lookup(|pwd, buf, len, out| {
        // SAFETY: as above.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, out) }
    })
}

fn lookup(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<Account>> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut out);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if out.is_null() {
            return Ok(None);
        }
        // SAFETY: on success pw_name points into `buf`, NUL-terminated.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned();
        return Ok(Some(Account { name, uid: pwd.pw_uid, gid: pwd.pw_gid }));
    }
}

fn group_name(gid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed group is a valid out-parameter; pointers valid for the call.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc == 0 && !out.is_null() {
        // SAFETY: gr_name points into `buf`, NUL-terminated.
        unsafe { CStr::from_ptr(grp.gr_name) }.to_string_lossy().into_owned()
    } else {
        gid.to_string()
    }
}

/// This host's name (the pod's, under Kubernetes), read in one place for
/// the settings (the SMTP greeting) and the record (which instance wrote).
pub fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string()).filter(|n| !n.is_empty())
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

/// The name this process runs as (its uid when the system has no name for it).
pub fn current_user() -> String {
    let uid = euid();
    user_by_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |a| a.name)
}

/// `user:group` of a uid/gid pair, by name where the system has one.
fn owner_of(meta: &std::fs::Metadata) -> String {
    let user = user_by_uid(meta.uid()).ok().flatten().map_or_else(|| meta.uid().to_string(), |a| a.name);
    format!("{user}:{}", group_name(meta.gid()))
}

/// The path itself when it exists, else its nearest existing ancestor (what
/// creating it needs to write).
fn existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| !p.as_os_str().is_empty() && p.symlink_metadata().is_ok()).map(Path::to_owned)
}

/// A permission problem with `path`, worded for an admin: which path, who
/// owns it, who this process is and the `chown` that fixes it.
pub fn permission_problem(path: &Path, writing: bool) -> String {
    let me = current_user();
    let at = existing(path).unwrap_or_else(|| path.to_owned());
    let owned = at.symlink_metadata().map(|m| format!(" (owned by {}, mode {:o})", owner_of(&m), m.mode() & 0o7777));
    let what = if writing { "write" } else { "read" };
    if at == path {
        return format!(
            "permission denied: {me}, the user mailtriage runs as, cannot {what} {}{}; give it to {me} \
             (chown -R {me}: {})",
            at.display(),
            owned.unwrap_or_default(),
            at.display(),
        );
    }
    // Never advise handing over an existing parent (it may be /var/lib):
    // create the first missing directory for the service instead.
    let first_missing = path.ancestors().take_while(|p| *p != at).last().unwrap_or(path);
    format!(
        "permission denied: {me}, the user mailtriage runs as, cannot create {} in {}{}; make the directory \
         for it (install -d -o {me} {})",
        path.display(),
        at.display(),
        owned.unwrap_or_default(),
        first_missing.display(),
    )
}

/// When root creates `path` inside a directory another user owns (the
/// service's state directory), gives `path` to that owner, so the service
/// can read and write what an admin's command left there. Does nothing for
/// other users, or in a directory root owns.
pub fn inherit_owner(path: &Path) -> io::Result<()> {
    if euid() != 0 {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::metadata(parent)?;
    if dir.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(dir.uid()), Some(dir.gid()))
}

/// `std::fs::create_dir_all`, each directory it creates owned as by
/// [`inherit_owner`].
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.exists()).collect();
    std::fs::create_dir_all(path)?;
    for dir in missing.into_iter().rev() {
        inherit_owner(dir)?;
    }
    Ok(())
}

/// An I/O error on `path`, described for an admin: a permission error as in
/// [`permission_problem`], anything else as `path: error`.
pub fn describe(path: &Path, err: &io::Error, writing: bool) -> String {
    if err.kind() == io::ErrorKind::PermissionDenied {
        permission_problem(path, writing)
    } else {
        format!("{}: {err}", path.display())
    }
}

/// Whether this process may write `path` (or create it, when it does not
/// exist yet): `None` when it may, else the problem in words.
pub fn check_writable(path: &Path) -> Option<String> {
    let at = existing(path)?;
    let dir = at.is_dir();
    let mode = if dir { libc::W_OK | libc::X_OK } else { libc::W_OK };
    let c = CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let ok = unsafe { libc::access(c.as_ptr(), mode) } == 0;
    (!ok).then(|| permission_problem(path, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_found_by_name_and_uid() {
        let root = user_by_uid(0).unwrap().expect("uid 0 has an account");
        assert_eq!(root.uid, 0);
        assert_eq!(user_by_name(&root.name).unwrap(), Some(root));
        assert_eq!(user_by_name("no-such-user-mailtriage-test").unwrap(), None);
        assert_eq!(user_by_name("nul\0byte").unwrap(), None);
    }

    #[test]
    fn a_permission_error_names_the_path_its_owner_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("heads/department.safetensors");
        let err = io::Error::from(io::ErrorKind::PermissionDenied);
        let text = describe(&file, &err, true);
        let me = current_user();
        assert!(text.starts_with("permission denied: "), "{text}");
        // The nearest existing ancestor is what creating the file needs.
        assert!(text.contains(&format!("{}", dir.path().display())), "{text}");
        assert!(text.contains(&format!("cannot create {}", file.display())), "{text}");
        // The fix creates the first missing directory; it never hands over an existing parent.
        assert!(text.contains(&format!("install -d -o {me} {}", dir.path().join("heads").display())), "{text}");
        assert!(!text.contains("chown"), "{text}");
        let existing = describe(dir.path(), &err, true);
        assert!(existing.contains(&format!("chown -R {me}: {}", dir.path().display())), "{existing}");
        let other = describe(&file, &io::Error::from(io::ErrorKind::NotFound), false);
        assert!(other.starts_with(&file.display().to_string()) && !other.contains("permission"), "{other}");
    }

    #[test]
    fn what_root_creates_in_another_users_directory_is_that_users() {
        if euid() != 0 {
            return; // only root can give files away; the test suite runs as root (scripts/test.sh)
        }
        let nobody = user_by_name("nobody").unwrap().expect("a `nobody` account");
        let top = tempfile::tempdir().unwrap();
        let state = top.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(nobody.uid), Some(nobody.gid)).unwrap();
        create_dir_all(&state.join("heads/v1")).unwrap();
        let file = state.join("heads/v1/department.safetensors");
        std::fs::write(&file, b"x").unwrap();
        inherit_owner(&file).unwrap();
        for p in [state.join("heads"), state.join("heads/v1"), file] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (nobody.uid, nobody.gid), "{}", p.display());
        }
        // In a directory root owns, root's files stay root's.
        let mine = top.path().join("mine");
        std::fs::write(&mine, b"x").unwrap();
        inherit_owner(&mine).unwrap();
        assert_eq!(std::fs::metadata(&mine).unwrap().uid(), 0);
    }

    #[test]
    fn writable_paths_pass_and_a_read_only_directory_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_writable(&dir.path().join("new/file")), None);
        if euid() == 0 {
            return; // root may write anything; the unprivileged case is run by tests/cli.rs as `nobody`
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let problem = check_writable(&dir.path().join("audit.jsonl")).expect("a read-only directory");
        assert!(problem.contains("permission denied") && problem.contains("mode 555"), "{problem}");
    }
}
