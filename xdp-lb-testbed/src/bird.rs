//! BIRD 2 routing daemons inside test namespaces: one process per namespace, run in the foreground
//! so the guard owns it (pause it with SIGSTOP to play a hung router, kill it on drop), with its own
//! control socket and pidfile (the file system is shared by every namespace).

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::netns::Netns;

/// BIRD answers on its control socket within this after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

pub struct Bird {
    name: String,
    netns: String,
    child: Option<Child>,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    paused: bool,
}

impl Bird {
    /// Writes `config` to `DIR/NAME.conf`, lets BIRD parse it (`bird -p`, so a bad config is an
    /// error naming the line), starts `bird -f` in `ns` and waits until its control socket answers.
    pub fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> anyhow::Result<Bird> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let check = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .output()
            .context("running `bird -p` (is Debian's bird2 installed? `cargo xtask setup` installs it)")?;
        if !check.status.success() {
            bail!(
                "BIRD refuses {} ({}):\n{}{}\n--- config ---\n{config}",
                conf.display(),
                check.status,
                String::from_utf8_lossy(&check.stderr),
                String::from_utf8_lossy(&check.stdout)
            );
        }
        let socket = dir.join(format!("{name}.ctl"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = ns.command("bird");
        cmd.arg("-f").arg("-c").arg(&conf).arg("-s").arg(&socket).arg("-P").arg(dir.join(format!("{name}.pid")));
        cmd.stdin(Stdio::null()).stdout(File::create(&log)?).stderr(File::create(dir.join(format!("{name}.stderr")))?);
        // Its own process group: a Ctrl-C at the terminal reaches only us (BIRD would shut down on
        // SIGINT and withdraw everything), and the guards stop it.
        cmd.process_group(0);
        // `ip netns exec` execs bird in place: the child's pid is BIRD's, which pause() signals.
        let child = ns.spawn(&mut cmd)?;
        let mut bird = Bird {
            name: name.to_string(),
            netns: ns.name().to_string(),
            child: Some(child),
            socket,
            config: conf,
            log,
            paused: false,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if bird.birdc(&["show", "status"]).is_ok() {
                return Ok(bird);
            }
            if let Some(status) = bird.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bird.child = None;
                bail!("BIRD {name} in {} exited ({status}) at start:\n{}", bird.netns, bird.output());
            }
            if Instant::now() > deadline {
                bail!("BIRD {name} in {}: no answer on {} within {START_TIMEOUT:?}", bird.netns, bird.socket.display());
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The config file this instance runs.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `birdc -s SOCKET args...`; an error (birdc exits non-zero when BIRD refuses the command or
    /// cannot be reached) carries its output.
    pub fn birdc(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running birdc")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || stdout.contains("Unable to connect") {
            bail!(
                "`birdc -s {} {}` for BIRD {} failed ({}): {}{}",
                self.socket.display(),
                args.join(" "),
                self.name,
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// Each BGP protocol's name and info column of `show protocols` (`Established` for a session
    /// that is up, else the state and the last error).
    pub fn bgp_sessions(&self) -> anyhow::Result<Vec<(String, String)>> {
        let out = self.birdc(&["show", "protocols"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                // name proto table state since info... (`since` is one word: a time today)
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 5 && cols[1] == "BGP").then(|| (cols[0].to_string(), cols[5..].join(" ")))
            })
            .collect())
    }

    /// SIGSTOP: BIRD stops answering its peers (BFD included), as a hung process would.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`Bird::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else { bail!("BIRD {} is not running", self.name) };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!("BIRD {} exited ({status}):\n{}", self.name, self.output());
        }
        let pid = child.id();
        // SAFETY: kill(2) on our own child, not reaped yet (try_wait just looked), so the pid is BIRD's.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            bail!("kill({pid}, {signal}) for BIRD {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// What BIRD printed so far (its log goes to stderr in the foreground).
    pub fn output(&self) -> String {
        let stderr = self.log.with_extension("stderr");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(stderr).unwrap_or_default()
        )
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL reaches a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for Bird {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bird({} in {})", self.name, self.netns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root and Debian's bird2 (`cargo xtask setup`), like every netns test.
    #[test]
    fn a_bad_config_is_refused_naming_its_line_and_a_good_one_answers() {
        let ns = Netns::new(&crate::netns::unique_prefix("bird")).expect("namespace");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Bird::start(&ns, dir.path(), "bad", "router id 10.0.0.1;\nprotocol nonsense { }\n").unwrap_err();
        assert!(format!("{e:#}").contains("bad.conf:2:"), "{e:#}");
        let mut bird = Bird::start(&ns, dir.path(), "good", "router id 10.0.0.1;\nprotocol device { }\n").expect("BIRD");
        assert!(bird.birdc(&["show", "status"]).expect("status").contains("Router ID is 10.0.0.1"));
        assert!(bird.birdc(&["disable", "nosuch"]).is_err(), "birdc errors must be errors");
        bird.pause().expect("SIGSTOP");
        assert!(bird.is_paused());
        bird.resume().expect("SIGCONT");
        assert!(bird.bgp_sessions().expect("protocols").is_empty());
    }
}
