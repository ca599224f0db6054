// Node-RED settings for bench/versus.py: the peer the gateway is measured against.
//
// Everything that differs per run (ports, broker password, escalation delay)
// comes from environment variables set by the bench, so this file and
// flows.json stay the same from run to run. The editor stays on, bound to
// loopback, as a user would run Node-RED; nothing here tunes it for speed.
module.exports = {
    uiHost: "127.0.0.1",
    uiPort: Number(process.env.NR_PORT || 1880),
    flowFile: "flows.json",
    // The credentials file holds only ${NR_MQTT_USER} and ${NR_MQTT_PASSWORD}
    // placeholders, filled from the environment; there is nothing to encrypt.
    credentialSecret: false,
    logging: {
        console: { level: "info", metrics: false, audit: false },
    },
    // No update checks or tours: the bench has no network and no person.
    telemetry: { enabled: false },
    editorTheme: { tours: false },
    externalModules: { palette: { allowInstall: false } },
};
