//! Connections as conntrack-tools list them (`conntrack -L`): the kernel's own NAT state,
//! independent of flowtrace, against which its translations are checked.

use std::net::IpAddr;

use crate::{netns::display_cmd, Error, Node, Result};

/// A 5-tuple as (protocol number, src, sport, dst, dport).
pub type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// Connections `conntrack -L` lists in `node`'s namespace whose original tuple matches
/// `filter` (conntrack's own flags, e.g. `-d 10.96.0.10`): (original, reply) per entry.
pub fn conntrack_list(node: &Node, filter: &[&str]) -> Result<Vec<(Tuple, Tuple)>> {
    let mut argv = vec!["conntrack", "-L"];
    argv.extend_from_slice(filter);
    let out = node.exec(&argv)?;
    parse_list(&String::from_utf8_lossy(&out.stdout)).map_err(|detail| Error::Parse {
        cmd: display_cmd(&argv),
        detail,
    })
}

/// The entries of `conntrack -L` output; lines without a protocol number are skipped.
fn parse_list(text: &str) -> std::result::Result<Vec<(Tuple, Tuple)>, String> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let proto: u8 = match line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        let field = |key: &str| -> Vec<&str> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .collect()
        };
        let (src, dst, sport, dport) = (
            field("src="),
            field("dst="),
            field("sport="),
            field("dport="),
        );
        if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
            return Err(format!("unexpected conntrack line: {line}"));
        }
        let bad = |what: &str| format!("unexpected {what} in conntrack line: {line}");
        let t = |i: usize| -> std::result::Result<Tuple, String> {
            Ok((
                proto,
                src[i].parse().map_err(|_| bad("src"))?,
                sport[i].parse().map_err(|_| bad("sport"))?,
                dst[i].parse().map_err(|_| bad("dst"))?,
                dport[i].parse().map_err(|_| bad("dport"))?,
            ))
        };
        entries.push((t(0)?, t(1)?));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_and_reply_tuples_are_read() {
        let text = "tcp      6 118 TIME_WAIT src=10.244.1.10 dst=10.96.0.10 sport=40000 dport=80 \
                    src=10.244.2.11 dst=10.244.1.10 sport=8080 dport=40000 [ASSURED] mark=0 use=1\n\
                    conntrack v1.4.8 (conntrack-tools): 1 flow entries have been shown.\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parse_list(text).unwrap(),
            vec![(
                (6, ip("10.244.1.10"), 40000, ip("10.96.0.10"), 80),
                (6, ip("10.244.2.11"), 8080, ip("10.244.1.10"), 40000)
            )]
        );
        assert!(parse_list("tcp 6 1 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2\n").is_err());
    }
}
