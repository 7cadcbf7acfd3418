const ms = require("ms");
console.log(`a day is ${ms("1d")} ms; 90000 ms is ${ms(90000)}`);
