'use strict';
/*
 * guacamole-lite 1.2.0 (npm, installed by bench/run into bench/.peers) as the relay
 * benchmark runs it: its stock Server, listening on 127.0.0.1, talking to the bench's
 * fake guacd, with the AES-256-CBC token key the load generator also uses.
 *
 *   node bench/peers_guacamole_lite.js PORT GUACD_PORT KEY
 *
 * Logging is at ERRORS (the library still prints one line per opened connection).
 */

const GuacamoleLite = require('guacamole-lite');

const [port, guacdPort, key] = process.argv.slice(2);

// eslint-disable-next-line no-new
new GuacamoleLite(
  { port: Number(port), host: '127.0.0.1' },
  { host: '127.0.0.1', port: Number(guacdPort) },
  { crypt: { cypher: 'AES-256-CBC', key }, log: { level: 'ERRORS' } },
);
