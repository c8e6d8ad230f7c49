"""A stand-in for the browser's WebSocket, for page tests in headless Chromium: a test opens it,
feeds it server frames (`ws().receive(channel, payload)`) and reads what the page sent
(`ws().sent`). Added as an init script before the page's own scripts run."""

FAKE_WEBSOCKET = """
class FakeWebSocket {
  constructor(url) {
    this.url = url; this.readyState = 0; this.sent = []; FakeWebSocket.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code) { this.readyState = 3; }
  open() { this.readyState = 1; if (this.onopen) this.onopen({}); }
  receive(channel, payload) {
    const frame = {channel, payload, ts: Date.now() / 1000};
    this.onmessage({data: JSON.stringify(frame)});
  }
}
FakeWebSocket.all = [];
window.WebSocket = FakeWebSocket;
window.ws = () => FakeWebSocket.all[FakeWebSocket.all.length - 1];
"""
