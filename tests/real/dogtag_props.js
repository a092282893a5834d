// Dogtag's own reading of CS.cfg, in the bed's JVM (jjs): a PropConfigStore over a FileConfigStore,
// load() as the CA does at start. Prints one JSON object per file named on the command line,
// {"key": "value", ..., "bool <flag>": "true"|"false"|"error"}, every UTF-16 unit outside printable ASCII escaped (\uXXXX). Dogtag 10.10
// reads the bytes as ISO-8859-1 (SimpleProperties.load), so each unit is one byte of the file.
var PropConfigStore = Java.type("com.netscape.cmscore.base.PropConfigStore");
var FileConfigStore = Java.type("com.netscape.cmscore.base.FileConfigStore");
function esc(s) {
  var out = "\"";
  for (var i = 0; i < s.length; i++) {
    var c = s.charCodeAt(i);
    if (c < 0x20 || c > 0x7e || c == 0x22 || c == 0x5c) out += "\\u" + ("0000" + c.toString(16)).slice(-4);
    else out += s.charAt(i);
  }
  return out + "\"";
}
for (var i = 0; i < arguments.length; i++) {
  var store = new PropConfigStore(new FileConfigStore(arguments[i]));
  store.load();
  var parts = [];
  var keys = store.keys();
  while (keys.hasMoreElements()) {
    var k = keys.nextElement();
    parts.push(esc(String(k)) + ": " + esc(String(store.get(k))));
    if (/enable[A-Za-z]*$/.test(k)) {
      // what the CA makes of a flag: "bool <key>" (a space never ends up in a key: it ends one)
      var b;
      try { b = String(store.getBoolean(k)); } catch (e) { b = "error"; }
      parts.push(esc("bool " + k) + ": " + esc(b));
    }
  }
  print("{" + parts.join(", ") + "}");
}
