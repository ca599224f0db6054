// Preloaded (NODE_OPTIONS=--require) for the "Node-RED, TCP_NODELAY" variant of
// bench/versus.py. Node-RED's MQTT client leaves Nagle's algorithm on, so a
// small publish right after another waits for the broker's ACK of the first.
// The gateway and the broker turn it off; this gives Node-RED the same.
const net = require("net");
const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
    this.setNoDelay(true);
    return connect.apply(this, args);
};
