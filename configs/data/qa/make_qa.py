#!/usr/bin/env python3
"""Generate the extractive-QA example set (train.json / dev.json), SQuAD v2.0 format.

Paragraphs, questions and answers were written for the tandem project; names of
people and small places in them are fictional. An answer is either a string, a
(string, anchor) pair meaning "the first occurrence of string at or after the
first occurrence of anchor", or None for an unanswerable question
("is_impossible": true). answer_start is a Python str index (Unicode code
points) into context and is asserted here.
Run: python3 make_qa.py   (writes next to this script)
"""
import json
import os
import re

TRAIN = [
("Elm Street Bakery",
 "The bakery on Elm Street was opened in 1998 by Margaret Hale, a retired chemistry teacher. It opens at six o'clock every morning except Sunday. Its best-selling item is a cinnamon roll that costs two dollars and fifty cents. On Saturdays the bakery also sells a dark rye loaf that usually runs out before nine.",
 [("Who opened the bakery on Elm Street?", "Margaret Hale"),
  ("What time does the bakery open?", "six o'clock"),
  ("How much does a cinnamon roll cost?", "two dollars and fifty cents"),
  ("How many people work at the bakery?", None)]),
("Honeybee communication",
 "Honeybees tell each other where flowers are by performing the waggle dance. A returning forager moves in a figure-eight pattern on the comb. The angle of the straight part of the dance shows the direction of the food relative to the sun. The duration of the waggle tells the other bees how far away the flowers are.",
 [("What is the dance performed by honeybees called?", "the waggle dance"),
  ("What pattern does the forager move in?", "a figure-eight pattern"),
  ("What does the duration of the waggle indicate?", "how far away the flowers are")]),
("Roman roads",
 "Roman engineers built more than 80,000 kilometres of paved roads. The roads were made of several layers, starting with sand and ending with large flat stones. Most were slightly curved in the middle so that rain would drain into ditches on each side. The most famous road, the Via Appia, connected Rome with the port of Brindisi.",
 [("How many kilometres of paved roads did the Romans build?", "more than 80,000 kilometres"),
  ("Why were the roads curved in the middle?", "so that rain would drain into ditches on each side"),
  ("Which port did the Via Appia connect to Rome?", "Brindisi"),
  ("Who designed the Via Appia?", None)]),
("Penguins",
 "Emperor penguins are the largest of all penguin species and can stand over one metre tall. They breed during the Antarctic winter, when temperatures can fall below minus forty degrees. The male keeps the single egg warm on his feet for about two months. During this time he does not eat and may lose almost half of his body weight.",
 [("Which penguin species is the largest?", "Emperor penguins"),
  ("How long does the male keep the egg warm?", "about two months"),
  ("How much body weight may the male lose?", "almost half of his body weight")]),
("The lighthouse",
 "The lighthouse on the northern cape was built in 1872 from grey granite. For ninety years a keeper lived in the cottage at its base and lit the lamp each evening. The light was automated in 1962, and the cottage became a small museum in 1985. Visitors can climb the 143 steps to the top on summer weekends.",
 [("When was the lighthouse built?", "1872"),
  ("What material was the lighthouse built from?", "grey granite"),
  ("How many steps lead to the top?", "143"),
  ("What was the name of the last keeper?", None)]),
("Making tomato sauce",
 "A simple tomato sauce takes about twenty-five minutes to make. Warm olive oil in a wide pan and gently fry two cloves of sliced garlic. Add a tin of crushed tomatoes and a pinch of salt, then let the sauce simmer until it thickens. Fresh basil should be added at the very end so that it keeps its colour.",
 [("How long does the sauce take to make?", "about twenty-five minutes"),
  ("How many cloves of garlic are used?", "two"),
  ("When should the basil be added?", "at the very end")]),
("The Silk Road",
 "The Silk Road was a network of trade routes linking China with the Mediterranean world. Merchants carried silk, paper, spices, and glass along its paths. The routes were named the Silk Road by the German geographer Ferdinand von Richthofen in 1877. Cities such as Samarkand grew rich by offering food and shelter to passing caravans.",
 [("What did the Silk Road link China with?", "the Mediterranean world"),
  ("Who named the Silk Road?", "Ferdinand von Richthofen"),
  ("In what year were the routes given the name Silk Road?", "1877"),
  ("Which city grew rich by serving caravans?", "Samarkand")]),
("Glaciers",
 "A glacier forms where more snow falls in winter than melts in summer. Over many years the snow is compressed into dense ice that slowly flows downhill. The Aletsch Glacier in Switzerland is the largest glacier in the Alps and is about twenty kilometres long. Like most glaciers in Europe, it has been shrinking for more than a century.",
 [("Where does a glacier form?", "where more snow falls in winter than melts in summer"),
  ("What is the largest glacier in the Alps?", "The Aletsch Glacier"),
  ("How long is the Aletsch Glacier?", "about twenty kilometres long")]),
("City marathon",
 "The city marathon took place on Sunday with more than 21,000 runners. The men's race was won by Daniel Kiprop in two hours, eight minutes and fourteen seconds. The women's winner, Ana Ribeiro, set a new course record. Volunteers handed out 150,000 cups of water along the route.",
 [("How many runners took part in the marathon?", "more than 21,000 runners"),
  ("Who won the men's race?", "Daniel Kiprop"),
  ("Who set a new course record?", "Ana Ribeiro"),
  ("How many volunteers helped at the marathon?", None)]),
("Octopuses",
 "Octopuses have three hearts and blue blood. Two of the hearts pump blood through the gills, while the third sends it to the rest of the body. Each of the eight arms contains a large number of nerve cells and can respond to touch without instructions from the brain. Most octopus species live for only one or two years.",
 [("How many hearts does an octopus have?", "three"),
  ("What colour is octopus blood?", "blue"),
  ("How long do most octopus species live?", "only one or two years")]),
("The printing press",
 "Johannes Gutenberg developed a printing press with movable metal type in Mainz around 1450. His most famous work is a Bible printed in about 180 copies. Printing spread quickly, and by 1500 there were presses in more than 250 European cities. Books became cheaper, and literacy slowly increased.",
 [("Where did Gutenberg develop his printing press?", "Mainz"),
  ("About how many copies of the Gutenberg Bible were printed?", "about 180 copies"),
  ("By 1500, how many European cities had printing presses?", "more than 250"),
  ("How much did a Gutenberg Bible cost in 1455?", None)]),
("Volleyball",
 "Volleyball was invented in 1895 by William G. Morgan, a physical education teacher in Massachusetts. He wanted a game that was less rough than basketball for older players. Each team has six players on court and may touch the ball three times before returning it. Beach volleyball, played in pairs, joined the Olympic programme in 1996.",
 [("Who invented volleyball?", "William G. Morgan"),
  ("How many players does each team have on court?", "six"),
  ("When did beach volleyball join the Olympic programme?", "1996")]),
("Kimchi",
 "Kimchi is a Korean side dish made from salted and fermented vegetables, most often napa cabbage and radish. Families traditionally prepare large amounts in late autumn in a custom called kimjang. In 2013 kimjang was added to the UNESCO list of intangible cultural heritage. As kimchi ages, it becomes more sour and is often used in stews.",
 [("What vegetables are most often used in kimchi?", "napa cabbage and radish"),
  ("What is the custom of preparing kimchi in autumn called?", ("kimjang", "custom called")),
  ("When was kimjang added to the UNESCO list?", "2013")]),
("Desert life",
 "The Sonoran Desert covers parts of the United States and Mexico. Many of its animals, such as kangaroo rats, spend the hottest hours in underground burrows. The saguaro cactus can grow over twelve metres tall and store hundreds of litres of water. After rare spring rains, wildflowers cover large areas of the desert.",
 [("Which countries does the Sonoran Desert cover?", "the United States and Mexico"),
  ("How tall can the saguaro cactus grow?", "over twelve metres tall"),
  ("What covers the desert after spring rains?", "wildflowers"),
  ("How much rain falls in the Sonoran Desert each year?", None)]),
("The covered market",
 "The city council voted on Tuesday to turn the old tram depot into a covered market. The brick building on Harbour Road has been empty since 2009. The plan includes sixty stalls, a community kitchen, and a small stage for music. Construction will cost about twelve million euros and should finish in 2027.",
 [("What will the old tram depot become?", "a covered market"),
  ("On which road is the tram depot?", "Harbour Road"),
  ("How much will construction cost?", "about twelve million euros")]),
("Sleep and memory",
 "During deep sleep the brain replays patterns of activity from the day, which helps to strengthen memories. Researchers at the University of Lübeck found that students who slept after learning word pairs remembered more of them. Teenagers tend to fall asleep later than adults because their internal clocks shift during puberty. Some schools have therefore moved their start time to half past nine.",
 [("What does the brain do during deep sleep?", "replays patterns of activity from the day"),
  ("Which university did the word-pair research?", "the University of Lübeck"),
  ("Why do teenagers fall asleep later than adults?", "their internal clocks shift during puberty"),
  ("To what time have some schools moved their start?", "half past nine")]),
("Jeju Island",
 "Jeju Island lies off the southern coast of Korea and was formed by volcanic eruptions. Hallasan, the highest mountain in South Korea, rises 1,947 metres in the centre of the island. Low walls of black basalt stone surround many fields and houses. In spring, yellow rapeseed flowers attract large numbers of visitors.",
 [("How was Jeju Island formed?", "by volcanic eruptions"),
  ("How high is Hallasan?", "1,947 metres"),
  ("What are the walls on Jeju made of?", "black basalt stone"),
  ("How many people live on Jeju Island?", None)]),
("Wind turbines",
 "A wind turbine turns the movement of air into electricity. Its blades are shaped like aircraft wings, so passing wind makes them rotate. A gearbox increases the speed of rotation before a generator produces electric current. Offshore turbines can be larger because winds at sea are stronger and more constant.",
 [("What does a wind turbine turn into electricity?", "the movement of air"),
  ("What are the blades shaped like?", "aircraft wings"),
  ("Why can offshore turbines be larger?", "winds at sea are stronger and more constant")]),
("The village post office",
 "The post office in Little Haddon has been run by the Pryce family since 1951. The current postmistress, Janet Pryce, took over from her father in 2004. Besides stamps, she sells newspapers, batteries, and greeting cards. When the national postal service planned to close the branch, 412 villagers signed a petition to keep it open.",
 [("Which family runs the Little Haddon post office?", "the Pryce family"),
  ("When did Janet Pryce take over?", "2004"),
  ("How many villagers signed the petition?", "412")]),
("Dolphins",
 "Bottlenose dolphins live in groups called pods, which usually contain between ten and thirty animals. Each dolphin develops a signature whistle that works much like a name. Dolphins find prey by echolocation, sending out clicks and listening for the echoes. In Shark Bay, Australia, some dolphins carry sea sponges on their snouts while searching the sea floor.",
 [("What are groups of dolphins called?", "pods"),
  ("What works much like a name for a dolphin?", "a signature whistle"),
  ("Where do some dolphins carry sea sponges?", "Shark Bay, Australia"),
  ("How long do bottlenose dolphins live?", None)]),
("Green tea",
 "Green tea and black tea come from the same plant, Camellia sinensis. For green tea, the fresh leaves are heated soon after picking to stop oxidation. This keeps the leaves green and gives the tea a grassy flavour. Tea experts recommend brewing green tea with water at about eighty degrees Celsius.",
 [("What plant do green and black tea come from?", "Camellia sinensis"),
  ("Why are the leaves heated soon after picking?", "to stop oxidation"),
  ("At what temperature should green tea be brewed?", "about eighty degrees Celsius")]),
("The four-day week",
 "Northway Software announced on Monday that its 340 employees will move to a four-day working week. Staff will work nine hours a day from Monday to Thursday. The chief executive, Laura Brandt, said a six-month trial showed no fall in productivity. The new schedule starts on the first of September.",
 [("How many employees does Northway Software have?", "340"),
  ("How many hours a day will staff work?", "nine hours"),
  ("Who is the chief executive of Northway Software?", "Laura Brandt"),
  ("When does the new schedule start?", "the first of September")]),
("Chess history",
 "Chess probably developed from an Indian game called chaturanga in the sixth century. The game reached Europe through Persia and the Arab world. Around 1475 the queen became the most powerful piece on the board, which made the game much faster. In 1997 the computer Deep Blue defeated the world champion in a six-game match.",
 [("What Indian game did chess develop from?", "chaturanga"),
  ("Around what year did the queen become the most powerful piece?", "1475"),
  ("Which computer defeated the world champion in 1997?", "Deep Blue")]),
("Hurricanes",
 "Hurricanes form over tropical oceans where the water temperature is at least 26 degrees Celsius. Warm, moist air rises and creates low pressure near the surface. The rotation of the Earth makes the storm spin, counterclockwise in the Northern Hemisphere. The calm centre of a hurricane is called the eye.",
 [("What is the minimum water temperature for a hurricane to form?", "26 degrees Celsius"),
  ("In which direction do hurricanes spin in the Northern Hemisphere?", "counterclockwise"),
  ("What is the calm centre of a hurricane called?", "the eye"),
  ("What was the strongest hurricane ever recorded?", None)]),
("Coffee",
 "Coffee plants grow best in tropical highlands between 1,000 and 2,000 metres above sea level. The seeds, called beans, are found inside red fruits known as coffee cherries. Ethiopia is widely believed to be the birthplace of coffee. Roasting turns the green beans brown and creates hundreds of aroma compounds.",
 [("At what altitude do coffee plants grow best?", "between 1,000 and 2,000 metres above sea level"),
  ("What are the fruits of the coffee plant called?", "coffee cherries"),
  ("Which country is believed to be the birthplace of coffee?", "Ethiopia")]),
("The human heart",
 "The human heart beats about 100,000 times a day and pumps around 7,500 litres of blood. It has four chambers: two atria on top and two ventricles below. The right ventricle sends blood to the lungs, and the left ventricle pumps it to the rest of the body. The heart has its own electrical system that controls the rhythm of each beat.",
 [("How many times a day does the heart beat?", "about 100,000 times"),
  ("How many chambers does the heart have?", "four"),
  ("Where does the right ventricle send blood?", "to the lungs")]),
("Open-air cinema",
 "The village of Bramley held its first open-air cinema night in July 2021. Volunteers hung a large white sheet between two oak trees in the churchyard. About 150 people came with chairs and blankets to watch a comedy from the 1950s. Halfway through the film the projector broke, and a teenager named Owen Clarke fixed the cable.",
 [("Where was the open-air cinema held?", "in the churchyard"),
  ("About how many people came to the first night?", "About 150 people"),
  ("Who fixed the projector cable?", "Owen Clarke"),
  ("What was the title of the film?", None)]),
("Vaccination history",
 "In 1796 the English doctor Edward Jenner noticed that milkmaids who had caught cowpox seemed protected from smallpox. He tested the idea on an eight-year-old boy named James Phipps. The word vaccine comes from the Latin word vacca, which means cow. Smallpox was declared eradicated by the World Health Organization in 1980.",
 [("Who was the English doctor who studied cowpox?", "Edward Jenner"),
  ("What was the name of the boy Jenner tested?", "James Phipps"),
  ("What does the Latin word vacca mean?", "cow"),
  ("When was smallpox declared eradicated?", "1980")]),
("Hanok houses",
 "A hanok is a traditional Korean house built from wood, earth, stone, and paper. Its heating system, called ondol, warms the floor using hot smoke from a kitchen fire. The wooden hall known as daecheong stays cool in summer because air can pass through it. Many hanok in the Bukchon area of Seoul have been turned into guesthouses and cafés.",
 [("What is the heating system of a hanok called?", "ondol"),
  ("What stays cool in summer because air passes through it?", "The wooden hall known as daecheong"),
  ("In which area of Seoul have many hanok become guesthouses?", "Bukchon")]),
("Ice hockey",
 "Ice hockey is played by two teams with six players each on the ice, including a goalkeeper. A game consists of three periods of twenty minutes. Players use sticks to shoot a hard rubber disc called a puck. The first organised indoor game was played in Montreal in 1875.",
 [("How many players does each team have on the ice?", "six"),
  ("How long is each period?", "twenty minutes"),
  ("Where was the first organised indoor game played?", "Montreal"),
  ("Who scored the first goal in ice hockey history?", None)]),
("The river flood",
 "After three days of heavy rain, the River Wend burst its banks on Friday night. Water reached the ground floor of shops along Market Street. About 200 volunteers filled sandbags to protect the primary school and the health clinic. Firefighters used boats to rescue 37 residents from their homes.",
 [("Which river burst its banks?", "the River Wend"),
  ("Which street's shops were flooded?", "Market Street"),
  ("How many residents were rescued by boat?", "37")]),
("Salt",
 "Salt has been used to preserve food for thousands of years. In ancient Rome soldiers were sometimes given an allowance to buy salt, and the word salary may come from this practice. Salt is produced by evaporating seawater or by mining rock salt underground. Health experts advise adults to eat less than five grams of salt per day.",
 [("What word may come from the Roman salt allowance?", "salary"),
  ("How is salt produced?", "by evaporating seawater or by mining rock salt underground"),
  ("How much salt per day do experts advise adults to eat at most?", "less than five grams")]),
("한글",
 "한글은 조선의 네 번째 임금인 세종대왕이 만든 문자이다. 1446년에 훈민정음이라는 이름으로 반포되었다. 자음은 소리를 낼 때 발음 기관의 모양을 본떠 만들었다. 한국에서는 매년 10월 9일을 한글날로 기념한다.",
 [("한글을 만든 임금은 누구인가?", "세종대왕"),
  ("한글은 몇 년에 반포되었는가?", "1446년"),
  ("한글날은 언제인가?", "10월 9일"),
  ("세종대왕은 몇 살에 왕위에 올랐는가?", None)]),
("부산 여행",
 "부산은 한국에서 두 번째로 큰 도시이다. 서울역에서 고속열차를 타면 약 두 시간 반 만에 도착할 수 있다. 해운대 해수욕장은 여름마다 많은 피서객으로 붐빈다. 밤에는 광안대교의 조명이 바다를 환하게 비춘다.",
 [("부산은 한국에서 몇 번째로 큰 도시인가?", "두 번째"),
  ("서울역에서 부산까지 고속열차로 얼마나 걸리는가?", "약 두 시간 반"),
  ("밤에 바다를 비추는 다리의 이름은 무엇인가?", "광안대교")]),
("된장찌개",
 "된장찌개는 한국 가정에서 자주 먹는 찌개이다. 먼저 멸치와 다시마로 육수를 낸다. 육수에 된장을 풀고 두부, 애호박, 양파를 넣어 끓인다. 마지막에 청양고추를 넣으면 칼칼한 맛이 난다.",
 [("육수는 무엇으로 내는가?", "멸치와 다시마"),
  ("칼칼한 맛을 내기 위해 마지막에 넣는 것은 무엇인가?", "청양고추"),
  ("된장찌개에 넣는 채소 중 하나는 무엇인가?", "애호박")]),
("경주",
 "경주는 약 천 년 동안 신라의 수도였다. 불국사와 석굴암은 1995년에 유네스코 세계유산으로 지정되었다. 첨성대는 동아시아에서 가장 오래된 천문대 가운데 하나로 알려져 있다. 도시 곳곳에는 커다란 왕릉이 언덕처럼 솟아 있다.",
 [("경주는 어느 나라의 수도였는가?", "신라"),
  ("불국사와 석굴암은 언제 세계유산으로 지정되었는가?", "1995년"),
  ("가장 오래된 천문대 가운데 하나로 알려진 것은 무엇인가?", "첨성대"),
  ("경주의 현재 인구는 몇 명인가?", None)]),
("Earthquake drills",
 "Schools in earthquake-prone regions hold regular safety drills. Students are taught to drop to the floor, take cover under a sturdy desk, and hold on until the shaking stops. After the shaking ends, they leave the building by the stairs and gather in an open area. In Japan, a national disaster prevention day is held on the first of September.",
 [("What are students taught to take cover under?", "a sturdy desk"),
  ("How do students leave the building after the shaking?", "by the stairs"),
  ("When is Japan's national disaster prevention day?", "the first of September")]),
("The Great Wall",
 "The Great Wall of China was built and rebuilt by several dynasties over about two thousand years. Most of the sections that survive today were constructed during the Ming dynasty. A survey published in 2012 measured all branches of the wall at about 21,196 kilometres. Some parts near Beijing, such as Badaling, receive millions of visitors each year.",
 [("During which dynasty were most surviving sections built?", "the Ming dynasty"),
  ("What total length did the 2012 survey measure?", "about 21,196 kilometres"),
  ("Which section near Beijing receives millions of visitors?", "Badaling"),
  ("How many workers died building the wall?", None)]),
("Sourdough",
 "Sourdough bread is leavened with a starter, a mixture of flour and water full of wild yeasts and lactic acid bacteria. The bacteria produce acids that give the bread its slightly sour taste. Bakers must feed their starter with fresh flour and water regularly to keep it alive. A starter kept in the refrigerator needs feeding about once a week.",
 [("What is sourdough bread leavened with?", "a starter"),
  ("What gives sourdough its slightly sour taste?", "acids"),
  ("How often does a refrigerated starter need feeding?", "about once a week")]),
("Owls",
 "Owls are mostly nocturnal birds of prey. In many species one ear opening sits higher on the head than the other, which helps the owl locate sounds precisely. Special fringed feathers allow owls to fly almost silently. Because their eyes cannot move in their sockets, owls can turn their heads by up to 270 degrees.",
 [("Why can owls locate sounds precisely?", "one ear opening sits higher on the head than the other"),
  ("What allows owls to fly almost silently?", "Special fringed feathers"),
  ("How far can owls turn their heads?", "up to 270 degrees")]),
]

DEV = [
("Photosynthesis",
 "Photosynthesis is the process by which green plants make sugar from light. The pigment chlorophyll, found in chloroplasts, absorbs mostly red and blue light. Plants combine carbon dioxide and water to form glucose and release oxygen. The process takes place mainly in the leaves.",
 [("What pigment absorbs light in plants?", "chlorophyll"),
  ("Which colours of light does chlorophyll absorb most?", "red and blue light"),
  ("Where does photosynthesis mainly take place?", "in the leaves"),
  ("How much oxygen does a tree produce each year?", None)]),
("The new library",
 "The new central library opened in March with a rooftop garden open to all visitors. The building was designed by the architect Sofia Lindqvist. It also contains a recording studio that can be booked free of charge with a library card. Since the opening, visitor numbers have doubled compared with the old branch.",
 [("When did the new central library open?", "in March"),
  ("Who designed the library building?", "Sofia Lindqvist"),
  ("What can be booked with a library card?", "a recording studio"),
  ("How many books does the library hold?", None)]),
("Elephants",
 "African elephants are the largest land animals on Earth, and adult males can weigh up to six tonnes. An elephant's trunk contains around 40,000 muscles. Herds are led by the oldest female, called the matriarch. She remembers the locations of water holes that the herd can use during droughts.",
 [("How much can adult male African elephants weigh?", "up to six tonnes"),
  ("How many muscles does an elephant's trunk contain?", "around 40,000"),
  ("What is the oldest female leading the herd called?", "the matriarch")]),
("Jazz",
 "Jazz developed in New Orleans in the early twentieth century. It combined blues, ragtime, and brass band music with African rhythms. Improvisation, in which musicians invent melodies on the spot, is one of its central features. In the 1940s a faster and more complex style called bebop appeared.",
 [("Where did jazz develop?", "New Orleans"),
  ("What is it called when musicians invent melodies on the spot?", "Improvisation"),
  ("What style appeared in the 1940s?", "bebop")]),
("The harbour fog",
 "Thick fog covered the harbour of Port Ellen on Wednesday morning. The first ferry to the mainland, due to leave at 7:15, was delayed for almost three hours. Passengers waited in the terminal café, which ran out of coffee before nine. The fog lifted shortly after ten o'clock.",
 [("Which harbour was covered by fog?", "Port Ellen"),
  ("When was the first ferry due to leave?", "7:15"),
  ("When did the fog lift?", "shortly after ten o'clock")]),
("Tennis scoring",
 "A tennis match is divided into sets, and each set is made up of games. To win a set, a player usually needs six games and a lead of at least two. If the score reaches six games all, a tiebreak is normally played. Within a game, the points are counted as fifteen, thirty, and forty.",
 [("What is a tennis set made up of?", ("games", "made up of")),
  ("What is normally played at six games all?", "a tiebreak"),
  ("How are points counted within a game?", "fifteen, thirty, and forty"),
  ("Who invented the tiebreak?", None)]),
("Rice",
 "Rice is the staple food of more than half of the world's population. It is usually grown in flooded fields called paddies, where the water helps to control weeds. Asia produces about ninety percent of the world's rice. Basmati and jasmine are two well-known fragrant varieties.",
 [("What are flooded rice fields called?", "paddies"),
  ("How much of the world's rice does Asia produce?", "about ninety percent"),
  ("Name a fragrant variety of rice.", "Basmati")]),
("The volunteer fire brigade",
 "The volunteer fire brigade in Stonebridge held an open day on Saturday. Children were allowed to sit in the fire engine and try on helmets. Firefighters showed how to put out a pan fire with a damp cloth instead of water. The brigade gave away 85 free smoke alarms to local households.",
 [("Where is the volunteer fire brigade?", "Stonebridge"),
  ("What should be used to put out a pan fire?", "a damp cloth"),
  ("How many smoke alarms were given away?", "85")]),
("제주 유채꽃",
 "제주도의 봄은 유채꽃으로 시작된다. 3월 말이 되면 섬 동쪽의 들판이 노란 꽃으로 뒤덮인다. 성산일출봉 근처는 사진을 찍으려는 관광객으로 특히 붐빈다. 유채꽃 축제는 보통 4월 초에 열린다.",
 [("제주도의 봄은 무엇으로 시작되는가?", ("유채꽃", "봄은")),
  ("관광객으로 특히 붐비는 곳은 어디 근처인가?", "성산일출봉"),
  ("유채꽃 축제는 보통 언제 열리는가?", "4월 초")]),
("라면",
 "라면은 1963년에 한국에서 처음 생산되었다. 한국은 일 인당 라면 소비량이 세계에서 가장 많은 나라 중 하나이다. 많은 사람이 라면에 달걀과 파를 넣어 끓여 먹는다. 나는 오늘 라면을 먹었다.",
 [("한국에서 라면이 처음 생산된 해는 언제인가?", "1963년"),
  ("라면에 흔히 넣는 재료는 무엇인가?", "달걀과 파"),
  ("라면 한 봉지의 가격은 얼마인가?", None)]),
]


def locate(context, answer):
    if isinstance(answer, tuple):
        text, anchor = answer
        start = context.index(text, context.index(anchor))
    else:
        text = answer
        if context.count(text) == 1:
            start = context.index(text)
        else:
            # Several raw matches (e.g. "cow" inside "cowpox"): use the single
            # occurrence that is not glued to surrounding letters or digits.
            hits = [m.start() for m in re.finditer(re.escape(text), context)
                    if (m.start() == 0 or not context[m.start() - 1].isalnum())
                    and (m.end() == len(context) or not context[m.end()].isalnum())]
            assert len(hits) == 1, (text, context)
            start = hits[0]
    assert context[start:start + len(text)] == text
    return text, start


def build(items, split):
    articles, seen = [], {}
    for p_idx, (title, context, qas) in enumerate(items):
        paragraph = {"context": context, "qas": []}
        for q_idx, (question, answer) in enumerate(qas):
            qid = f"{split}-{p_idx:03d}-{q_idx}"
            if answer is None:
                paragraph["qas"].append({"id": qid, "question": question,
                                         "answers": [], "is_impossible": True})
            else:
                text, start = locate(context, answer)
                paragraph["qas"].append({"id": qid, "question": question,
                                         "answers": [{"text": text, "answer_start": start}],
                                         "is_impossible": False})
        if title in seen:
            seen[title]["paragraphs"].append(paragraph)
        else:
            seen[title] = {"title": title, "paragraphs": [paragraph]}
            articles.append(seen[title])
    return {"version": "v2.0", "data": articles}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for name, items, split in [("train.json", TRAIN, "train"), ("dev.json", DEV, "dev")]:
        doc = build(items, split)
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        qs = [q for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
        n_imp = sum(q["is_impossible"] for q in qs)
        n_par = sum(len(a["paragraphs"]) for a in doc["data"])
        print(f"{name}: {n_par} paragraphs, {len(qs)} questions, {n_imp} unanswerable")


if __name__ == "__main__":
    main()
