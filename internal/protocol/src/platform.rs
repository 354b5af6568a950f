//! Supported agent platforms and their fixed file names: the one table the server, the agent, the install scripts
//! and the release scripts agree on (a test in `tests/` holds the scripts to it).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Os {
    Linux,
    Windows,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Os {
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Windows => "windows",
        }
    }
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// One supported (os, arch) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: Os,
    pub arch: Arch,
}

/// Every platform an agent is built for, in manifest order.
pub const PLATFORMS: [Platform; 3] = [
    Platform { os: Os::Linux, arch: Arch::Amd64 },
    Platform { os: Os::Linux, arch: Arch::Arm64 },
    Platform { os: Os::Windows, arch: Arch::Amd64 },
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported platform {os:?}/{arch:?}; supported: {}", supported_list())]
pub struct PlatformError {
    pub os: String,
    pub arch: String,
}

/// `linux/amd64, linux/arm64, windows/amd64`.
pub fn supported_list() -> String {
    PLATFORMS.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

impl Platform {
    /// Maps request values to a platform. Only the exact lowercase names are accepted.
    pub fn parse(os: &str, arch: &str) -> Result<Platform, PlatformError> {
        PLATFORMS
            .iter()
            .copied()
            .find(|p| p.os.as_str() == os && p.arch.as_str() == arch)
            .ok_or_else(|| PlatformError { os: clip(os), arch: clip(arch) })
    }

    /// `restic-manager-agent-<os>-<arch>[.exe]`: the only names the binary endpoint can ever open.
    pub fn file_name(self) -> &'static str {
        match (self.os, self.arch) {
            (Os::Linux, Arch::Amd64) => "restic-manager-agent-linux-amd64",
            (Os::Linux, Arch::Arm64) => "restic-manager-agent-linux-arm64",
            (Os::Windows, Arch::Amd64) => "restic-manager-agent-windows-amd64.exe",
            (Os::Windows, Arch::Arm64) => "restic-manager-agent-windows-arm64.exe",
        }
    }

    /// `restic-<os>-<arch>[.exe]`: the restic build the server hands out for this platform (`/restic/binary`), beside
    /// the agent's own file in the same closed table.
    pub fn restic_file_name(self) -> &'static str {
        match (self.os, self.arch) {
            (Os::Linux, Arch::Amd64) => "restic-linux-amd64",
            (Os::Linux, Arch::Arm64) => "restic-linux-arm64",
            (Os::Windows, Arch::Amd64) => "restic-windows-amd64.exe",
            (Os::Windows, Arch::Arm64) => "restic-windows-arm64.exe",
        }
    }

    /// The platform this program was compiled for, if it is a supported one.
    pub fn host() -> Option<Platform> {
        let os = match std::env::consts::OS {
            "linux" => "linux",
            "windows" => "windows",
            _ => return None,
        };
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            _ => return None,
        };
        Platform::parse(os, arch).ok()
    }
}

/// Request values are echoed in errors; keep that bounded.
fn clip(value: &str) -> String {
    value.chars().take(64).collect()
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os.as_str(), self.arch.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_pairs_map_to_fixed_names() {
        let names: Vec<_> = PLATFORMS.iter().map(|p| p.file_name()).collect();
        assert_eq!(
            names,
            [
                "restic-manager-agent-linux-amd64",
                "restic-manager-agent-linux-arm64",
                "restic-manager-agent-windows-amd64.exe"
            ]
        );
        assert_eq!(Platform::parse("windows", "amd64").unwrap().file_name(), names[2]);
        let restic: Vec<_> = PLATFORMS.iter().map(|p| p.restic_file_name()).collect();
        assert_eq!(restic, ["restic-linux-amd64", "restic-linux-arm64", "restic-windows-amd64.exe"]);
    }

    #[test]
    fn everything_else_is_refused() {
        for (os, arch) in [
            ("windows", "arm64"),
            ("darwin", "amd64"),
            ("Linux", "amd64"),
            ("linux", "x86_64"),
            ("linux", "AMD64"),
            ("linux ", "amd64"),
            ("", ""),
            ("../linux", "amd64"),
        ] {
            let err = Platform::parse(os, arch).unwrap_err();
            assert!(err.to_string().contains("linux/amd64, linux/arm64, windows/amd64"), "{err}");
        }
    }
}
