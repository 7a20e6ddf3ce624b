//! The Debian package, installed on this machine as a sysadmin would (`dpkg -i`), checked,
//! and purged. `scripts/test` builds it first (`cargo deb --locked`, into the target
//! directory's `debian/`): building it from inside `cargo test` would wait on the build
//! directory's lock that this very test run holds.
//!
//! The installed /usr/bin/herald is never run by another test: they run the cargo-built
//! binary by its path, and put its directory first on the PATH of what they start.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::util::{Herald, require};

const PACKAGE: &str = "herald";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `target/debian/herald_<version>-1_<arch>.deb` in the target directory this test was
/// built in.
fn deb() -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_herald"))
        .parent()
        .and_then(Path::parent)
        .expect("the target directory");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_string();
    let deb = target.join(format!(
        "debian/{PACKAGE}_{}-1_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        deb.is_file(),
        "{} is absent: scripts/test builds it before `cargo test` (by hand: cargo deb --locked)",
        deb.display()
    );
    deb
}

fn installed() -> bool {
    let o = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
    String::from_utf8_lossy(&o.stdout).contains("install ok installed")
}

fn user_exists(name: &str) -> bool {
    run(Command::new("getent").args(["passwd", name]))
        .status
        .success()
}

/// dpkg once it can take its lock: another dpkg or apt on the machine holds it for a
/// while, and waiting is bounded.
fn dpkg(args: &[&str]) -> Output {
    for _ in 0..120 {
        let o = run(Command::new("dpkg").args(args));
        if o.status.success() || !text(&o).contains("lock") {
            return o;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("dpkg {args:?}: the dpkg lock stayed taken for a minute");
}

/// Purges the package when the test ends, passed or not: nothing is left installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = dpkg(&["--purge", PACKAGE]);
        }
    }
}

/// Where each file lands (README, "Install from a package"), and what it is a copy of.
const FILES: &[(&str, &str)] = &[
    (
        "/usr/lib/systemd/system/herald.service",
        "systemd/herald.service",
    ),
    (
        "/usr/lib/systemd/system/herald.socket",
        "systemd/herald.socket",
    ),
    (
        "/usr/lib/systemd/system/herald@.service",
        "systemd/herald@.service",
    ),
    (
        "/usr/lib/systemd/system/herald@.socket",
        "systemd/herald@.socket",
    ),
    (
        "/usr/lib/systemd/system/herald.service.d/debian.conf",
        "debian/systemd/herald.service.d/debian.conf",
    ),
    (
        "/usr/lib/systemd/system/herald@.service.d/debian.conf",
        "debian/systemd/herald@.service.d/debian.conf",
    ),
    ("/etc/default/herald", "debian/default"),
    (
        "/usr/share/herald/sysctl.d/90-herald.conf",
        "systemd/sysctl.d/90-herald.conf",
    ),
    (
        "/usr/share/herald/supervisor/herald.conf",
        "supervisor/herald.conf",
    ),
    (
        "/usr/share/herald/supervisor/herald-redis.conf",
        "supervisor/herald-redis.conf",
    ),
    (
        "/usr/share/herald/supervisor/herald-reuseport.conf",
        "supervisor/herald-reuseport.conf",
    ),
    (
        "/usr/share/herald/supervisor/supervisord.conf",
        "supervisor/supervisord.conf",
    ),
    (
        "/usr/share/herald/supervisor/supervisord-redis.conf",
        "supervisor/supervisord-redis.conf",
    ),
    (
        "/usr/share/herald/supervisor/supervisord-reuseport.conf",
        "supervisor/supervisord-reuseport.conf",
    ),
    (
        "/usr/share/herald/haproxy/haproxy.cfg",
        "haproxy/haproxy.cfg",
    ),
    (
        "/usr/share/herald/rolling-restart",
        "scripts/rolling-restart",
    ),
    ("/usr/share/doc/herald/README.md", "README.md"),
];

fn mode(path: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_debian_package_installs_verifies_runs_and_purges() {
    for (program, package) in [
        ("dpkg", "dpkg"),
        ("systemd-analyze", "systemd"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("setpriv", "util-linux"),
    ] {
        require(program, package);
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "dpkg -i needs root: run this test as root (CI does)");
    let deb = deb();
    assert!(
        !installed(),
        "a {PACKAGE} package is installed on this machine already; this test would replace \
         it (dpkg --purge {PACKAGE} if it is a leftover)"
    );
    assert!(
        !user_exists("herald"),
        "a `herald` user exists already, so the package could not be seen creating it \
         (userdel herald if it is a leftover)"
    );

    let _purge = Installed;
    let o = dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert!(installed());

    // The files, where README says, identical to the repository's, with their modes.
    for (path, source) in FILES {
        let got = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            got == std::fs::read(repo(source)).unwrap(),
            "{path} differs from {source}"
        );
    }
    assert_eq!(mode("/usr/bin/herald"), 0o755);
    assert_eq!(
        mode("/etc/default/herald"),
        0o600,
        "it may hold the API key"
    );
    assert_eq!(mode("/usr/share/herald/rolling-restart"), 0o755);
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]));
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/default/herald"),
        "/etc/default/herald is not a conffile: an upgrade would overwrite the operator's edits"
    );

    // The system user the units run as.
    let passwd = run(Command::new("getent").args(["passwd", "herald"]));
    let entry = String::from_utf8_lossy(&passwd.stdout).trim().to_string();
    let fields: Vec<&str> = entry.split(':').collect();
    assert_eq!(fields.len(), 7, "getent passwd herald: {entry:?}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {entry}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{entry}");

    // systemd-analyze verify on the installed units, with /usr/local/bin emptied in a
    // private mount namespace: the shipped units name /usr/local/bin/herald, so they pass
    // only if the package's drop-ins (ExecStart=/usr/bin/herald, User=herald) apply. A
    // copy of the unit without its drop-in is verified beside them and must be refused.
    let scratch = std::env::temp_dir().join(format!("herald-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let units = Path::new("/usr/lib/systemd/system");
    for (template, instance) in [
        ("herald@.service", "herald@8080.service"),
        ("herald@.socket", "herald@8080.socket"),
    ] {
        std::os::unix::fs::symlink(units.join(template), scratch.join(instance)).unwrap();
    }
    let verify = |files: &[PathBuf]| {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let script = format!(
            "mount -t tmpfs tmpfs /usr/local/bin && systemd-analyze verify {}",
            files.join(" ")
        );
        run(Command::new("unshare").args(["--mount", "sh", "-c", &script]))
    };
    let o = verify(&[
        units.join("herald.service"),
        units.join("herald.socket"),
        scratch.join("herald@8080.service"),
        scratch.join("herald@8080.socket"),
    ]);
    assert!(
        o.status.success() && text(&o).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&o)
    );
    let bare = scratch.join("herald-without-dropin.service");
    std::fs::copy(units.join("herald.service"), &bare).unwrap();
    let o = verify(&[bare]);
    assert!(
        text(&o).contains("/usr/local/bin/herald"),
        "without the drop-in, verify should miss /usr/local/bin/herald: {}",
        text(&o)
    );

    // The installed binary: its version, `herald check`, and serving as the `herald` user.
    let o = run(Command::new("/usr/bin/herald").arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("herald {}", env!("CARGO_PKG_VERSION"))
    );
    let o = run(Command::new("/usr/bin/herald").args(["check", "--connections", "100"]));
    let out = text(&o);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{out}");
    for section in [
        "herald check: 100 connections",
        "\nhost:\n",
        "open files: hard limit",
    ] {
        assert!(out.contains(section), "{section:?} missing:\n{out}");
    }
    // The operators' probes come in the same binary.
    for (sub, flag) in [("tail", "--follow"), ("check", "--live")] {
        let o = run(Command::new("/usr/bin/herald").args([sub, "--help"]));
        assert!(
            text(&o).contains(flag),
            "herald {sub} --help lacks {flag}: {}",
            text(&o)
        );
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=herald",
        "--regid=herald",
        "--clear-groups",
        "/usr/bin/herald",
        "--listen",
        "127.0.0.1:0",
    ]);
    let herald = Herald::spawn(cmd);
    let r = herald.request("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(herald.terminate().success());

    // Purged: every file, and the user, gone.
    let o = dpkg(&["--purge", PACKAGE]);
    assert!(o.status.success(), "dpkg --purge: {}", text(&o));
    assert!(!installed());
    for path in FILES.iter().map(|(p, _)| *p).chain(["/usr/bin/herald"]) {
        assert!(!Path::new(path).exists(), "{path} is left after the purge");
    }
    for dir in [
        "/usr/share/herald",
        "/usr/lib/systemd/system/herald.service.d",
    ] {
        assert!(!Path::new(dir).exists(), "{dir} is left after the purge");
    }
    assert!(
        !user_exists("herald"),
        "the herald user is left after the purge"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
