//! Which kernels capture is known to work on: measured, not read from documentation, by
//! `cargo xtask vm-test` in Debian guests (11: 5.10, 12: 6.1, 13: 6.12; every program attached,
//! sk_lookup inbound and the sk_msg local hop included). On an older kernel a failure to load
//! or attach names that, so the operator is not left with a verifier log alone.

use super::Error;

/// The oldest kernel capture was measured on.
pub const MIN_TESTED: &str = "5.10";
const MIN: (u32, u32) = (5, 10);

/// `major.minor` of a kernel release string (`6.1.0-57-amd64`, `5.10.0-32-amd64`).
fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn running() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| r.trim().to_string())
}

/// `e`, said to be on an untested kernel when it is one.
pub fn explain(e: Error) -> Error {
    match running() {
        Some(release) => explain_on(e, &release),
        None => e,
    }
}

fn explain_on(e: Error, release: &str) -> Error {
    let older = major_minor(release).is_some_and(|v| v < MIN);
    match e {
        Error::NotRoot | Error::NoCgroup2(_) | Error::CgroupMissing(_) => e,
        e if older => Error::OlderKernel {
            release: release.to_string(),
            source: Box::new(e),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_on_an_older_kernel_names_the_oldest_tested() {
        let e = explain_on(Error::MapMissing("vips"), "4.19.0-27-amd64");
        let msg = e.to_string();
        assert!(
            msg.contains("Linux 4.19.0-27-amd64") && msg.contains("tested on 5.10"),
            "{msg}"
        );
        // A tested kernel keeps the error as it was; so does a missing cgroup anywhere.
        assert!(matches!(
            explain_on(Error::MapMissing("vips"), "5.10.0-32-amd64"),
            Error::MapMissing(_)
        ));
        assert!(matches!(
            explain_on(Error::NotRoot, "4.19.0"),
            Error::NotRoot
        ));
        assert_eq!(major_minor("6.12.118+deb13-amd64"), Some((6, 12)));
    }
}
