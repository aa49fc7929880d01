// Validates every .graphql document in a directory against GitHub's public GraphQL schema
// (@octokit/graphql-schema). Exits non-zero if any document is invalid or none is found.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { validate } from '@octokit/graphql-schema';

const dir = process.argv[2];
const files = readdirSync(dir).filter((name) => name.endsWith('.graphql')).sort();
if (files.length === 0) {
  console.error(`no .graphql documents in ${dir}`);
  process.exit(1);
}
let invalid = 0;
for (const name of files) {
  const errors = validate(readFileSync(join(dir, name), 'utf8'));
  if (errors.length > 0) {
    invalid += 1;
    for (const error of errors) console.error(`✗ ${name}: ${error.message}`);
  } else {
    console.log(`✓ ${name}`);
  }
}
console.log(`${files.length - invalid} valid, ${invalid} invalid`);
process.exit(invalid > 0 ? 1 : 0);
