//! What libvirt knows about the QEMU processes it runs, read from its live status files
//! (`/run/libvirt/qemu/NAME.xml`: `<domstatus pid=…>` around the live `<domain>`, with device
//! aliases), and, for OpenStack guests, the Nova instance in the domain's `<metadata>`
//! (display name, project, flavor). Parsing is pure; the file reading is in
//! [`crate::identity::discovery`].

use serde::{Deserialize, Serialize};

/// The XML namespace prefix of Nova's instance metadata (`…/nova/1.0`, `…/nova/1.1`).
const NOVA_NAMESPACE: &str = "http://openstack.org/xmlns/libvirt/nova/";

/// A libvirt domain, from its live status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtDomain {
    /// The QEMU process libvirt started for it.
    #[serde(skip)]
    pub pid: Option<u32>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The OpenStack instance, when Nova created the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova: Option<NovaInstance>,
    /// Legacy devices as libvirt configured them (kind, index, alias).
    #[serde(skip)]
    pub devices: Vec<LibvirtDevice>,
}

/// An OpenStack Nova instance (`<nova:instance>` in the domain's metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NovaInstance {
    /// The server's display name (`openstack server list` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
}

/// A device of the domain that sits at well-known ISA ports: `serial`, `parallel`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtDevice {
    /// `serial`, `parallel`, `usb` (a controller), `input`, `video`, `disk` ...
    pub kind: String,
    /// `<target port='N'/>` for serial/parallel ports; the controller index otherwise.
    pub index: Option<u32>,
    /// libvirt's alias (`serial0`, `parallel0`, `usb`), also QEMU's device id.
    pub alias: Option<String>,
    /// `model` (controllers, video) or `target type` (serial: `isa-serial`).
    pub model: Option<String>,
}

fn text_of(node: roxmltree::Node<'_, '_>) -> Option<String> {
    let t = node.text()?.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn nova(metadata: roxmltree::Node<'_, '_>) -> Option<NovaInstance> {
    let instance = metadata.children().find(|c| {
        c.is_element()
            && c.tag_name().name() == "instance"
            && c.tag_name()
                .namespace()
                .is_some_and(|ns| ns.starts_with(NOVA_NAMESPACE))
    })?;
    let owner = child(instance, "owner");
    Some(NovaInstance {
        name: child(instance, "name").and_then(text_of),
        project: owner.and_then(|o| child(o, "project")).and_then(text_of),
        project_id: owner
            .and_then(|o| child(o, "project"))
            .and_then(|p| p.attribute("uuid"))
            .map(String::from),
        user: owner.and_then(|o| child(o, "user")).and_then(text_of),
        flavor: child(instance, "flavor")
            .and_then(|f| f.attribute("name"))
            .map(String::from),
    })
}

fn devices(domain: roxmltree::Node<'_, '_>) -> Vec<LibvirtDevice> {
    let Some(devices) = child(domain, "devices") else {
        return Vec::new();
    };
    devices
        .children()
        .filter(|c| c.is_element())
        .filter_map(|d| {
            let name = d.tag_name().name();
            let alias = child(d, "alias")
                .and_then(|a| a.attribute("name"))
                .map(String::from);
            let target = child(d, "target");
            let (kind, index, model) = match name {
                "serial" | "parallel" | "console" => (
                    name.to_string(),
                    target.and_then(|t| t.attribute("port")?.parse().ok()),
                    target.and_then(|t| t.attribute("type")).map(String::from),
                ),
                "controller" => (
                    d.attribute("type").unwrap_or("controller").to_string(),
                    d.attribute("index").and_then(|i| i.parse().ok()),
                    d.attribute("model").map(String::from),
                ),
                "input" | "video" | "disk" | "sound" | "watchdog" => (
                    name.to_string(),
                    None,
                    d.attribute("type")
                        .or_else(|| d.attribute("device"))
                        .or_else(|| child(d, "model").and_then(|m| m.attribute("type")))
                        .map(String::from),
                ),
                _ => return None,
            };
            Some(LibvirtDevice {
                kind,
                index,
                alias,
                model,
            })
        })
        .collect()
}

/// Parses a live status file (`<domstatus pid=…><domain>…</domain></domstatus>`), or a plain
/// `<domain>` (an inactive definition; then there is no pid).
pub fn parse_status(xml: &str) -> Result<LibvirtDomain, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    let (pid, domain) = match root.tag_name().name() {
        "domstatus" => (
            root.attribute("pid").and_then(|p| p.parse().ok()),
            child(root, "domain").ok_or("a <domstatus> without a <domain>")?,
        ),
        "domain" => (None, root),
        other => return Err(format!("not a libvirt domain status: <{other}>")),
    };
    let name = child(domain, "name")
        .and_then(text_of)
        .ok_or("a <domain> without a <name>")?;
    Ok(LibvirtDomain {
        pid,
        name,
        uuid: child(domain, "uuid").and_then(text_of),
        nova: child(domain, "metadata").and_then(nova),
        devices: devices(domain),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of libvirt 9.0's `/run/libvirt/qemu/NAME.xml`, cut down, with the metadata
    /// Nova writes.
    const STATUS: &str = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST.
-->
<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-3-instance-0000002a/monitor.sock' type='unix'/>
  <domain type='kvm' id='3'>
    <name>instance-0000002a</name>
    <uuid>5f1c2a9e-7b3d-4c11-9a0e-2d4f6b8c1e37</uuid>
    <metadata>
      <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
        <nova:package version="27.1.0"/>
        <nova:name>web-frontend-01</nova:name>
        <nova:creationTime>2026-11-30 09:12:44</nova:creationTime>
        <nova:flavor name="m1.small">
          <nova:memory>2048</nova:memory>
          <nova:vcpus>1</nova:vcpus>
        </nova:flavor>
        <nova:owner>
          <nova:user uuid="0f6a">alice</nova:user>
          <nova:project uuid="8d3c">shop</nova:project>
        </nova:owner>
      </nova:instance>
    </metadata>
    <devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <controller type='usb' index='0' model='piix3-uhci'>
        <alias name='usb'/>
      </controller>
      <serial type='pty'>
        <target type='isa-serial' port='0'><model name='isa-serial'/></target>
        <alias name='serial0'/>
      </serial>
      <parallel type='pty'><target port='0'/><alias name='parallel0'/></parallel>
      <input type='tablet' bus='usb'><alias name='input0'/></input>
      <video><model type='cirrus' vram='16384' heads='1'/><alias name='video0'/></video>
    </devices>
  </domain>
</domstatus>
"#;

    #[test]
    fn status_file_with_nova_metadata() {
        let d = parse_status(STATUS).unwrap();
        assert_eq!(d.pid, Some(4242));
        assert_eq!(d.name, "instance-0000002a");
        assert_eq!(
            d.uuid.as_deref(),
            Some("5f1c2a9e-7b3d-4c11-9a0e-2d4f6b8c1e37")
        );
        let nova = d.nova.unwrap();
        assert_eq!(nova.name.as_deref(), Some("web-frontend-01"));
        assert_eq!(nova.project.as_deref(), Some("shop"));
        assert_eq!(nova.project_id.as_deref(), Some("8d3c"));
        assert_eq!(nova.user.as_deref(), Some("alice"));
        assert_eq!(nova.flavor.as_deref(), Some("m1.small"));
        let kinds: Vec<(&str, Option<u32>, Option<&str>)> = d
            .devices
            .iter()
            .map(|d| (d.kind.as_str(), d.index, d.alias.as_deref()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("usb", Some(0), Some("usb")),
                ("serial", Some(0), Some("serial0")),
                ("parallel", Some(0), Some("parallel0")),
                ("input", None, Some("input0")),
                ("video", None, Some("video0")),
            ]
        );
        assert_eq!(d.devices[0].model.as_deref(), Some("piix3-uhci"));
    }

    #[test]
    fn plain_domains_and_garbage() {
        let d = parse_status("<domain type='qemu'><name>quiet</name></domain>").unwrap();
        assert_eq!((d.name.as_str(), d.pid, d.nova), ("quiet", None, None));
        assert!(parse_status("").is_err());
        assert!(parse_status("<domstatus pid='1'/>").is_err());
        assert!(parse_status("<domain><uuid>x</uuid></domain>").is_err());
        assert!(parse_status("<html/>").is_err());
        // Metadata of other tools is not Nova's.
        let other = "<domain><name>x</name><metadata><app:instance \
                     xmlns:app='http://example.com/1'><app:name>y</app:name></app:instance>\
                     </metadata></domain>";
        assert_eq!(parse_status(other).unwrap().nova, None);
    }

    #[test]
    fn random_input_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let bytes = STATUS.as_bytes();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let cut = (seed as usize) % bytes.len();
            let mut mutated = bytes[..cut].to_vec();
            mutated.push((seed >> 32) as u8);
            mutated.extend_from_slice(&bytes[cut..]);
            let _ = parse_status(&String::from_utf8_lossy(&mutated));
        }
    }
}
